"""Deterministic k-means (k-means++ seeding + Lloyd) in numpy.

Used by DoGraph every round on a few hundred/thousand projected gradients, so it is written for
reproducibility, not scale: the same input and seed give the same labels on every rank. Ties go to
the lowest cluster index; an empty cluster is re-seeded with the point farthest from its centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KMeansResult", "kmeans", "kmeans_pp_init"]


@dataclass
class KMeansResult:
    labels: np.ndarray    # [n] cluster of each point, 0..k-1
    centers: np.ndarray   # [k, dim]
    inertia: float        # Σ squared distance to the assigned centre
    k: int                # clusters actually used (may be < requested when points repeat)
    n_iter: int


def _sqdist(x: np.ndarray, c: np.ndarray, xx: np.ndarray) -> np.ndarray:
    d = xx[:, None] - 2.0 * (x @ c.T) + np.einsum("ij,ij->i", c, c)[None, :]
    return np.maximum(d, 0.0)


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): returns indices of ``k`` initial centres."""
    n = x.shape[0]
    xx = np.einsum("ij,ij->i", x, x)
    idx = [int(rng.integers(n))]
    d2 = _sqdist(x, x[idx], xx)[:, 0]
    for _ in range(1, k):
        tot = d2.sum()
        if tot <= 0:
            # all remaining points coincide with a centre: take the first unused index
            unused = np.setdiff1d(np.arange(n), idx)
            nxt = int(unused[0])
        else:
            nxt = int(rng.choice(n, p=d2 / tot))
        idx.append(nxt)
        d2 = np.minimum(d2, _sqdist(x, x[nxt:nxt + 1], xx)[:, 0])
    return np.asarray(idx)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           tol: float = 1e-10) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups; best of ``n_init`` seeded restarts.

    ``k`` is reduced to the number of distinct rows when there are fewer. Raises ``ValueError`` on
    empty or non-finite input.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [n, dim] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("kmeans input contains NaN/inf")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_distinct = np.unique(x, axis=0).shape[0]
    k = min(k, n_distinct)
    xx = np.einsum("ij,ij->i", x, x)
    best: KMeansResult | None = None
    for run in range(max(1, n_init)):
        rng = np.random.default_rng([int(seed), run])
        centers = x[kmeans_pp_init(x, k, rng)].copy()
        prev_inertia = np.inf
        labels = np.zeros(x.shape[0], dtype=np.int64)
        it = 0
        for it in range(1, max_iter + 1):
            d = _sqdist(x, centers, xx)
            labels = np.argmin(d, axis=1)
            mind = d[np.arange(x.shape[0]), labels]
            for c in range(k):
                members = labels == c
                if members.any():
                    centers[c] = x[members].mean(axis=0)
                else:
                    far = int(np.argmax(mind))
                    centers[c] = x[far]
                    labels[far] = c
                    mind[far] = 0.0
            inertia = float(_sqdist(x, centers, xx)[np.arange(x.shape[0]), labels].sum())
            if prev_inertia - inertia <= tol * max(1.0, abs(prev_inertia) if np.isfinite(prev_inertia) else 1.0):
                break
            prev_inertia = inertia
        d = _sqdist(x, centers, xx)
        labels = np.argmin(d, axis=1)
        inertia = float(d[np.arange(x.shape[0]), labels].sum())
        if best is None or inertia < best.inertia - 1e-12:
            best = KMeansResult(labels=labels, centers=centers, inertia=inertia, k=k, n_iter=it)
    assert best is not None
    return best

"""DoGraph (arXiv 2604.07963): model-centric domains from k-means on projected per-sample gradients.

Each round:

1. Cluster this round's projected per-sample gradients ``g_i`` (``snapshot.per_sample``) into ``m``
   groups with deterministic k-means++ (``cfg.dograph_clusters``, 0 = number of domains; rows are
   L2-normalised first when ``cfg.dograph_cosine``).
2. Per cluster: size ``n_c``, mean gradient ``ḡ_c``, intra-cluster variance ``σ_c²``.
3. Cluster weights ``π`` on the simplex by one objective (``cfg.dograph_objective``). The paper's text
   gives the objectives only in words, so these are our concrete, documented forms. Mean gradients are
   first divided by their RMS norm ``s = sqrt(mean_c ‖ḡ_c‖²)``, so every objective is invariant to the
   gradient scale:

   ``variance``   min_π  m·Σ_c (π_c a_c − mean_j π_j a_j)²  −  β·⟨Σ_c π_c ḡ_c, ḡ⟩ / ‖ḡ‖²
                  with ``a_c = ‖ḡ_c‖`` and ``ḡ`` the round's overall mean gradient: equalise each
                  cluster's contribution ``π_c a_c`` while keeping the global descent direction.
                  Convex (strictly, on the simplex); solved by accelerated projected gradient with the
                  exact Euclidean projection onto the simplex (:func:`megamix.simplex.project`).
   ``robust``     max_π Σ_c π_c h_c + τ·H(π): the entropy-smoothed max over clusters (DRO), closed form
                  ``π = softmax(h/τ)``. ``h_c`` is the cluster's mean per-sample loss when the snapshot
                  has ``extra["per_sample_loss"]`` ([n]); else the mean of its samples' domain losses
                  (``snapshot.domain_loss``) when those are finite; else ``h_c = ‖ḡ_c‖`` (normalised),
                  the first-order loss decrease still available on that cluster.
   ``alignment``  fixed point of ``π = softmax(cos(ḡ_c, Σ_j π_j ḡ_j)/τ)``, found by damped fixed-point
                  iterations from the cluster-size shares: weight clusters by how well they align with
                  the aggregate update.
   ``uncertainty`` min_π Σ_c π_c² σ_c² on the simplex, closed form ``π_c ∝ 1/σ_c²`` (inverse-variance
                  weighting). Clusters with fewer than 2 points get the median variance of the others
                  (uniform π when no cluster has 2 points).

4. Map clusters back to the loader's domains (the loader samples by domain):
   ``w_d = Σ_c π_c · n_{c,d} / n_c`` where ``n_{c,d}`` counts cluster c's samples from domain d
   (:func:`clusters_to_domains`). A cluster's weight is shared among the domains its samples came
   from. Property: if π equals the clusters' own shares ``n_c/n``, ``w`` equals the domains' shares
   of this round's samples, i.e. "no preference" maps to "no change".
5. Guards from :mod:`megamix.strategies.base`: a round whose per-sample gradients are all zero (no
   gradient signal, :func:`~megamix.strategies.base.no_signal`) keeps the previous weights, as R&B does,
   instead of clustering zeros (which would move the weights toward the round's sample counts); domains
   below ``cfg.min_count`` samples keep their previous weight, then EMA, the floor and the optional drift
   bound.
"""
from __future__ import annotations

import numpy as np

from megamix.simplex import project, softmax
from megamix.snapshot import StatsSnapshot
from megamix.strategies.base import MixingStrategy, no_signal
from megamix.strategies.kmeans import kmeans

__all__ = ["DoGraphStrategy", "variance_weights", "robust_weights",
           "alignment_weights", "uncertainty_weights", "clusters_to_domains", "cluster_stats",
           "OBJECTIVES"]

OBJECTIVES = ("variance", "robust", "alignment", "uncertainty")


def _scale(means: np.ndarray) -> np.ndarray:
    s = float(np.sqrt(np.mean(np.einsum("ij,ij->i", means, means))))
    if not np.isfinite(s) or s == 0.0:
        raise FloatingPointError("all cluster mean gradients are zero or non-finite")
    return means / s


def variance_objective(pi: np.ndarray, means: np.ndarray, overall: np.ndarray, beta: float) -> float:
    """The variance objective (on normalised inputs; see the module docstring)."""
    a = np.linalg.norm(means, axis=1)
    m = len(a)
    c = pi * a
    ref = float(overall @ overall)
    lin = float((pi @ means) @ overall) / ref if ref > 0 else 0.0
    return float(m * np.sum((c - c.mean()) ** 2) - beta * lin)


def variance_weights(means: np.ndarray, overall: np.ndarray, beta: float = 1.0,
                     iters: int = 2000, tol: float = 1e-12) -> np.ndarray:
    """Minimise the variance objective over the simplex (accelerated projected gradient, FISTA).

    ``means`` ``[m, k]`` cluster mean gradients, ``overall`` ``[k]`` the round's mean gradient.
    """
    means = np.asarray(means, np.float64)
    s = float(np.sqrt(np.mean(np.einsum("ij,ij->i", means, means))))
    if not np.isfinite(s) or s == 0.0:
        raise FloatingPointError("all cluster mean gradients are zero or non-finite")
    means = means / s
    overall = np.asarray(overall, np.float64) / s
    m = means.shape[0]
    if m == 1:
        return np.ones(1)
    a = np.linalg.norm(means, axis=1)
    ref = float(overall @ overall)
    lin = (means @ overall) / ref if ref > 0 else np.zeros(m)
    cen = np.eye(m) - 1.0 / m
    # J(π) = m·‖C D π‖² − β·linᵀπ ; ∇J = 2m·D Cᵀ C D π − β·lin ; C is symmetric idempotent
    H = 2.0 * m * (a[:, None] * cen * a[None, :])
    L = float(np.linalg.eigvalsh(H).max())
    step = 1.0 / L if L > 0 else 1.0
    x = np.full(m, 1.0 / m)
    y = x.copy()
    t = 1.0
    for _ in range(int(iters)):
        x_new = project(y - step * (H @ y - beta * lin))
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        done = np.max(np.abs(x_new - x)) < tol
        x, t = x_new, t_new
        if done:
            break
    return x / x.sum()


def robust_weights(hardness: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """``argmax_π Σ π_c h_c + τ·H(π)`` over the simplex = ``softmax(h/τ)``."""
    h = np.asarray(hardness, np.float64)
    if not np.all(np.isfinite(h)):
        raise FloatingPointError("non-finite cluster hardness")
    if tau <= 0:
        raise ValueError("tau must be > 0")
    return softmax(h / tau)


def alignment_residual(pi: np.ndarray, unit_means: np.ndarray, tau: float) -> np.ndarray:
    """``softmax(cos(ḡ_c, Σ π_j ḡ_j)/τ) − π`` for unit-norm ``ḡ_c`` rows (zero at the fixed point)."""
    agg = pi @ unit_means
    nrm = np.linalg.norm(agg)
    cos = unit_means @ agg / nrm if nrm > 0 else np.zeros(len(pi))
    return softmax(cos / tau) - pi


def alignment_weights(means: np.ndarray, tau: float = 1.0, init: np.ndarray | None = None,
                      iters: int = 200, damping: float = 0.5, tol: float = 1e-12) -> np.ndarray:
    """Fixed point of ``π = softmax(cos(ḡ_c, ḡ(π))/τ)`` with ``ḡ(π) = Σ π_c ḡ_c`` (damped iterations).

    ``means`` are scaled to unit norm first, so the aggregate direction is that of the normalised
    means (cosines, not magnitudes, drive the weights). Zero-norm clusters get cosine 0.
    """
    means = np.asarray(means, np.float64)
    m = means.shape[0]
    norms = np.linalg.norm(means, axis=1)
    if not np.all(np.isfinite(norms)) or not np.any(norms > 0):
        raise FloatingPointError("all cluster mean gradients are zero or non-finite")
    unit = np.where(norms[:, None] > 0, means / np.where(norms > 0, norms, 1.0)[:, None], 0.0)
    pi = np.full(m, 1.0 / m) if init is None else np.asarray(init, np.float64) / np.sum(init)
    for _ in range(int(iters)):
        r = alignment_residual(pi, unit, tau)
        pi = pi + damping * r
        if np.max(np.abs(r)) < tol:
            break
    return pi / pi.sum()


def uncertainty_weights(variances: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``argmin_π Σ π_c² σ_c²`` over the simplex = ``(1/σ²) / Σ(1/σ²)``.

    Non-finite or negative variances raise; zero variances are lifted to ``eps·mean(σ²)``.
    """
    v = np.asarray(variances, np.float64)
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise FloatingPointError(f"bad cluster variances {v.tolist()}")
    ref = float(v.mean()) if v.mean() > 0 else 1.0
    inv = 1.0 / np.maximum(v, eps * ref)
    return inv / inv.sum()


def cluster_stats(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sizes [k], means [k, dim], variances [k])``; empty clusters have size 0, mean 0, var nan.

    The variance is the mean squared distance of a cluster's points to its mean; NaN for clusters
    with fewer than 2 points.
    """
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    means = np.zeros((k, x.shape[1]))
    var = np.full(k, np.nan)
    for c in range(k):
        members = x[labels == c]
        if len(members):
            means[c] = members.mean(axis=0)
        if len(members) >= 2:
            var[c] = float(np.mean(np.sum((members - means[c]) ** 2, axis=1)))
    return sizes, means, var


def clusters_to_domains(pi: np.ndarray, labels: np.ndarray, domains: np.ndarray,
                        num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster weights → domain weights: ``w_d = Σ_c π_c · n_{c,d} / n_c``, normalised.

    Returns ``(w [D], contingency n [k, D])``. Empty clusters contribute nothing (their π mass is
    dropped before normalising). Raises when no non-empty cluster has positive weight.
    """
    pi = np.asarray(pi, np.float64)
    k = len(pi)
    labels = np.asarray(labels, np.int64)
    domains = np.asarray(domains, np.int64)
    if labels.shape != domains.shape:
        raise ValueError("labels and domains must have the same length")
    if len(domains) and (domains.min() < 0 or domains.max() >= num_domains):
        raise ValueError(f"domain ids must be in [0, {num_domains})")
    n = np.zeros((k, num_domains))
    np.add.at(n, (labels, domains), 1.0)
    nc = n.sum(axis=1)
    share = np.divide(n, nc[:, None], out=np.zeros_like(n), where=nc[:, None] > 0)
    w = pi @ share
    if w.sum() <= 0:
        raise FloatingPointError("all cluster weight fell on empty clusters")
    return w / w.sum(), n


class DoGraphStrategy(MixingStrategy):
    """DoGraph with model-centric clusters mapped back to domain sampling weights."""

    name = "dograph"
    needs_per_sample = True

    def _raw_update(self, snap: StatsSnapshot, info: dict):
        cfg = self.cfg
        d = len(self.domain_names)
        x = np.asarray(snap.per_sample, np.float64)
        dom = np.asarray(snap.per_sample_domain, np.int64)
        if x.ndim != 2 or dom.shape != (x.shape[0],):
            raise ValueError(f"per_sample {x.shape} and per_sample_domain {dom.shape} do not match")
        finite = np.all(np.isfinite(x), axis=1)
        if not finite.all():
            info["dropped_nonfinite"] = int((~finite).sum())
        x, dom = x[finite], dom[finite]
        loss = snap.extra.get("per_sample_loss")
        if loss is not None:
            loss = np.asarray(loss, np.float64).reshape(-1)
            if loss.shape[0] != finite.shape[0]:
                raise ValueError("extra['per_sample_loss'] must have one entry per per_sample row")
            loss = loss[finite]
        if x.shape[0] == 0:
            info["fallback"] = "no (finite) per-sample gradients this round"
            return None
        problem = no_signal(x, "every per-sample gradient")
        if problem:  # clustering zeros would move the weights toward this round's sample counts
            info["fallback"] = problem
            return None
        counts = np.bincount(dom, minlength=d).astype(np.float64)
        active = self.count_mask(counts)
        self._dom = dom
        self._domain_loss = None if snap.domain_loss is None else np.asarray(snap.domain_loss, np.float64)
        m = cfg.dograph_clusters or d
        feats = x
        if cfg.dograph_cosine:
            nrm = np.linalg.norm(x, axis=1, keepdims=True)
            feats = np.divide(x, nrm, out=np.zeros_like(x), where=nrm > 0)
        km = kmeans(feats, m, seed=cfg.seed + self.rounds, n_init=3, max_iter=100)
        sizes, means, var = cluster_stats(x, km.labels, km.k)
        nonempty = sizes > 0
        info.update(clusters=int(km.k), cluster_sizes=sizes.astype(int).tolist(),
                    objective=cfg.dograph_objective)
        try:
            pi_ne = self._objective(means[nonempty], sizes[nonempty], var[nonempty], x,
                                    km.labels, loss, nonempty)
        except FloatingPointError as e:
            info["fallback"] = f"DoGraph {cfg.dograph_objective} objective failed: {e}"
            return None
        pi = np.zeros(km.k)
        pi[nonempty] = pi_ne
        w, contingency = clusters_to_domains(pi, km.labels, dom, d)
        info["cluster_weights"] = pi.tolist()
        info["contingency"] = contingency.astype(int).tolist()
        info["cluster_gram"] = (means @ means.T).tolist()
        return w, active

    def _objective(self, means, sizes, var, x, labels, loss, nonempty) -> np.ndarray:
        cfg = self.cfg
        obj = cfg.dograph_objective
        if means.shape[0] == 1:
            return np.ones(1)
        if obj == "variance":
            overall = (sizes @ means) / sizes.sum()
            return variance_weights(means, overall, beta=cfg.dograph_beta, iters=max(cfg.dograph_iters, 500))
        if obj == "robust":
            ids = np.nonzero(nonempty)[0]
            dl = self._domain_loss
            if loss is not None:
                h = np.array([loss[labels == c].mean() for c in ids])
            elif dl is not None and np.all(np.isfinite(dl[np.unique(self._dom)])):
                # cluster hardness = its samples' average domain loss (Σ_d n_cd/n_c · loss_d)
                h = np.array([np.mean(dl[self._dom[labels == c]]) for c in ids])
            else:
                h = np.linalg.norm(_scale(means), axis=1)
            return robust_weights(h, cfg.dograph_tau)
        if obj == "alignment":
            return alignment_weights(means, cfg.dograph_tau, init=sizes / sizes.sum(),
                                     iters=cfg.dograph_iters)
        if obj == "uncertainty":
            v = var.copy()
            ok = np.isfinite(v)
            if not ok.any():
                return np.full(len(sizes), 1.0 / len(sizes))  # documented: uniform
            v[~ok] = float(np.median(v[ok]))
            return uncertainty_weights(v)
        raise ValueError(f"unknown DoGraph objective {obj!r}; choose one of {OBJECTIVES}")

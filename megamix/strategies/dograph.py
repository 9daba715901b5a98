"""DoGraph (arXiv 2604.07963): model-centric domains from k-means on projected per-sample gradients.

Two strategies share the clustering and the four objectives:

- ``dograph`` (:class:`DoGraphStrategy`, the paper's method): **reweights the gradient update** by
  cluster, ``update = Σ_c π_c ḡ_c``; the loader keeps sampling the starting mixture.
- ``dograph-sample`` (:class:`DoGraphSampleStrategy`, the earlier variant): turns π into domain
  *sampling* weights. When clusters cut across domains this loses π (an even contingency table maps
  any π to the round's domain shares), which is why it is no longer the default.

Each round (every ``mixing.update_every`` steps), on the round's reservoir of projected per-sample
gradients ``g_i`` (``snapshot.per_sample``: at most ``mixing.dograph_reservoir`` rows, a seeded uniform
sample of the round's samples that is identical on every rank, see :mod:`megamix.stats`):

1. The rows, in key order (``extra["per_sample_keys"]``, so the order is the same for any number of
   ranks), are clustered into ``m`` groups by deterministic k-means++ (``cfg.dograph_clusters``;
   0 = the paper's 11, or the number of domains if smaller; rows are L2-normalised first when
   ``cfg.dograph_cosine``).
2. Per cluster: reservoir share ``q_c = n_c / n``, mean gradient ``ḡ_c``, intra-cluster variance
   ``σ_c²`` and mean per-sample train loss ``h_c`` (``extra["per_sample_loss"]``).
3. Cluster weights ``π`` on the simplex by one objective (``cfg.dograph_objective``). The paper's text
   gives the objectives in words only, so these are our concrete, documented forms. Mean gradients are
   first divided by their RMS norm ``s = sqrt(mean_c ‖ḡ_c‖²)``, so every objective is invariant to the
   gradient scale:

   ``variance``   min_π  m·Σ_c (π_c a_c − mean_j π_j a_j)²  −  β·⟨Σ_c π_c ḡ_c, ḡ⟩ / ‖ḡ‖²
                  with ``a_c = ‖ḡ_c‖`` and ``ḡ`` the round's overall mean gradient: equalise each
                  cluster's contribution ``π_c a_c`` while keeping the global descent direction.
                  Convex (strictly, on the simplex); solved by accelerated projected gradient with the
                  exact Euclidean projection onto the simplex (:func:`megamix.simplex.project`).
   ``robust``     max_π Σ_c π_c h_c + τ·H(π): the entropy-smoothed max over clusters (DRO), closed form
                  ``π = softmax(h/τ)`` with ``h_c`` the cluster's own mean per-sample loss. Without
                  per-sample losses the round keeps the previous weights (``last_info["fallback"]``).
   ``alignment``  fixed point of ``π = softmax(cos(ḡ_c, Σ_j π_j ḡ_j)/τ)``, found by damped fixed-point
                  iterations from the cluster shares: weight clusters by how well they align with the
                  aggregate update.
   ``uncertainty`` (default; the paper's best) min_π Σ_c π_c² σ_c² on the simplex, closed form
                  ``π_c ∝ 1/σ_c²`` (inverse-variance weighting). Clusters with fewer than 2 points get the
                  median variance of the others (uniform π when no cluster has 2 points).

4. ``dograph``: the centroids, ``π`` (floored at ``mixing.min_weight``) and ``q`` are kept until the next
   refresh. Every training sample is assigned to its nearest centroid (:meth:`DoGraphStrategy.sample_factors`)
   and its loss gets the factor ``ω_i = π_c / q_c``; the Mixer normalises the factors to mean 1 over the
   micro-batch's samples (``w_i = ω_i · b / Σ_j ω_j``), so the loss scale is kept and, when the batch's
   cluster shares equal ``q``, its update is exactly ``Σ_c π_c ḡ_c``. Until the first refresh every weight
   is 1. The domain sampling weights never change.

   Both: a round whose per-sample gradients are all zero (no gradient signal,
   :func:`~megamix.strategies.base.no_signal`) keeps the previous weights, as R&B does, instead of
   clustering zeros (which would move the weights toward the round's sample counts).

   ``dograph-sample``: clusters map back to the loader's domains by
   ``w_d = Σ_c π_c · n_{c,d} / n_c`` (:func:`clusters_to_domains`), then the guards of
   :mod:`megamix.strategies.base` apply (min count, EMA, floor, drift bound). This equals the per-domain
   mass ``Σ_{i∈d} w_i / Σ_i w_i`` of the ``dograph`` weights on the same rows.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from megamix import simplex
from megamix.kernels.utils import no_autocast
from megamix.simplex import project, softmax
from megamix.snapshot import StatsSnapshot
from megamix.strategies.base import GradientReweighter, MixingStrategy, no_signal
from megamix.strategies.kmeans import kmeans

log = logging.getLogger("megamix.strategies")

__all__ = ["DoGraphStrategy", "DoGraphSampleStrategy", "variance_weights", "robust_weights",
           "alignment_weights", "uncertainty_weights", "clusters_to_domains", "cluster_stats",
           "OBJECTIVES", "PAPER_CLUSTERS"]

OBJECTIVES = ("variance", "robust", "alignment", "uncertainty")

#: the paper's number of clusters m (its Appendix A.7 sweep: 7..15, best at 11)
PAPER_CLUSTERS = 11


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


class _Fit(NamedTuple):
    """One round's clustering: rows in key order, their domains and labels, per-cluster statistics and π."""

    x: np.ndarray           # [n, k] finite rows
    dom: np.ndarray         # [n]
    labels: np.ndarray      # [n] cluster of each row
    centers: np.ndarray     # [m, k] k-means centres in feature space (unit rows' space when cosine)
    sizes: np.ndarray       # [m]
    means: np.ndarray       # [m, k]
    pi: np.ndarray          # [m] cluster weights (0 on empty clusters)


class _DoGraphBase(MixingStrategy):
    """Clustering of the round's reservoir and the objective; subclasses decide what π acts on."""

    needs_per_sample = True

    def num_clusters(self) -> int:
        """m: ``cfg.dograph_clusters``, or the paper's 11 capped at the number of domains."""
        return int(self.cfg.dograph_clusters) or min(PAPER_CLUSTERS, len(self.domain_names))

    def _features(self, x: np.ndarray) -> np.ndarray:
        if not self.cfg.dograph_cosine:
            return x
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, nrm, out=np.zeros_like(x), where=nrm > 0)

    def _fit(self, snap: StatsSnapshot, info: dict) -> _Fit | None:
        """Cluster the snapshot's rows and solve the objective; None (with ``info["fallback"]``) when the
        round has no usable rows or the objective has no signal."""
        x = np.asarray(snap.per_sample, np.float64)
        dom = np.asarray(snap.per_sample_domain, np.int64)
        if x.ndim != 2 or dom.shape != (x.shape[0],):
            raise ValueError(f"per_sample {x.shape} and per_sample_domain {dom.shape} do not match")
        loss = snap.extra.get("per_sample_loss")
        if loss is not None:
            loss = np.asarray(loss, np.float64).reshape(-1)
            if loss.shape[0] != x.shape[0]:
                raise ValueError("extra['per_sample_loss'] must have one entry per per_sample row")
        keys = snap.extra.get("per_sample_keys")
        if keys is not None and len(keys) == x.shape[0]:
            # key order: the same rows in the same order whatever the number of ranks that produced them
            order = np.argsort(np.asarray(keys), kind="stable")
            x, dom = x[order], dom[order]
            loss = None if loss is None else loss[order]
        finite = np.all(np.isfinite(x), axis=1)
        if not finite.all():
            info["dropped_nonfinite"] = int((~finite).sum())
        x, dom = x[finite], dom[finite]
        loss = None if loss is None else loss[finite]
        if x.shape[0] == 0:
            info["fallback"] = "no (finite) per-sample gradients this round"
            return None
        problem = no_signal(x, "every per-sample gradient")
        if problem:  # clustering zeros would move the weights toward this round's sample counts
            info["fallback"] = problem
            return None
        km = kmeans(self._features(x), self.num_clusters(), seed=self.cfg.seed + self.rounds, n_init=3,
                    max_iter=100)
        sizes, means, var = cluster_stats(x, km.labels, km.k)
        nonempty = sizes > 0
        info.update(clusters=int(km.k), cluster_sizes=sizes.astype(int).tolist(),
                    objective=self.cfg.dograph_objective, rows=int(x.shape[0]))
        try:
            pi_ne = self._objective(means[nonempty], sizes[nonempty], var[nonempty], loss, km.labels, nonempty)
        except FloatingPointError as e:
            info["fallback"] = f"DoGraph {self.cfg.dograph_objective} objective failed: {e}"
            return None
        pi = np.zeros(km.k)
        pi[nonempty] = pi_ne
        _, contingency = clusters_to_domains(pi, km.labels, dom, len(self.domain_names))
        info["contingency"] = contingency.astype(int).tolist()
        info["cluster_gram"] = (means @ means.T).tolist()
        return _Fit(x, dom, km.labels, km.centers, sizes, means, pi)

    def _objective(self, means, sizes, var, loss, labels, nonempty) -> np.ndarray:
        cfg = self.cfg
        obj = cfg.dograph_objective
        if means.shape[0] == 1:
            return np.ones(1)
        if obj == "variance":
            overall = (sizes @ means) / sizes.sum()
            return variance_weights(means, overall, beta=cfg.dograph_beta, iters=max(cfg.dograph_iters, 500))
        if obj == "robust":
            ids = np.nonzero(nonempty)[0]
            if loss is None or not np.all(np.isfinite(loss)):
                raise FloatingPointError("the robust objective needs every row's per-sample train loss "
                                         "(snapshot.extra['per_sample_loss']); the round has none or NaNs")
            h = np.array([loss[labels == c].mean() for c in ids])   # each cluster's own mean loss
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


class DoGraphSampleStrategy(_DoGraphBase):
    """``dograph-sample``: DoGraph's cluster weights mapped back to domain sampling weights."""

    name = "dograph-sample"

    def _raw_update(self, snap: StatsSnapshot, current: np.ndarray, info: dict):
        fit = self._fit(snap, info)
        if fit is None:
            return None
        d = len(self.domain_names)
        active = self.count_mask(np.bincount(fit.dom, minlength=d).astype(np.float64))
        w, _ = clusters_to_domains(fit.pi, fit.labels, fit.dom, d)
        info["cluster_weights"] = fit.pi.tolist()
        return w, active


class DoGraphStrategy(_DoGraphBase, GradientReweighter):
    """``dograph``: the paper's in-step reweighting of the gradient update by model-centric cluster.

    After each round, :attr:`centroids` ``[m, k]``, :attr:`cluster_weights` π and :attr:`cluster_shares`
    q describe the clusters; :meth:`sample_factors` gives each training sample its factor ``π_c / q_c``
    (the Mixer, which holds it as its :class:`~megamix.strategies.base.GradientReweighter`, normalises them per
    micro-batch). :meth:`propose` never changes the domain weights.
    """

    name = "dograph"

    def __init__(self, domain_names, initial_weights, cfg, *, max_drift: float | None = None):
        super().__init__(domain_names, initial_weights, cfg, max_drift=max_drift)
        self.centroids: np.ndarray | None = None        # [m, k] in feature space
        self.cluster_weights: np.ndarray | None = None  # π [m]
        self.cluster_shares: np.ndarray | None = None   # q [m], reservoir shares at the refresh
        self._device_cache: tuple | None = None

    @property
    def factors(self) -> np.ndarray | None:
        """``π_c / q_c`` per cluster, or None before the first refresh."""
        if self.centroids is None:
            return None
        return self.cluster_weights / self.cluster_shares

    def set_clusters(self, centroids, cluster_weights, cluster_shares) -> None:
        """Install a cluster table (a refresh's result, or rank 0's broadcast one); all None clears it."""
        self._device_cache = None
        if centroids is None:
            self.centroids = self.cluster_weights = self.cluster_shares = None
            return
        c = np.asarray(centroids, np.float64)
        pi = np.asarray(cluster_weights, np.float64)
        q = np.asarray(cluster_shares, np.float64)
        if c.ndim != 2 or pi.shape != (c.shape[0],) or q.shape != (c.shape[0],):
            raise ValueError(f"cluster table shapes do not match: centroids {c.shape}, pi {pi.shape}, q {q.shape}")
        if not (np.all(np.isfinite(c)) and np.all(pi >= 0) and np.all(q > 0)):
            raise ValueError("cluster table must be finite with pi >= 0 and q > 0")
        self.centroids, self.cluster_weights, self.cluster_shares = c, pi, q

    def _update(self, snap: StatsSnapshot, prev: np.ndarray, info: dict) -> np.ndarray:
        """Refresh the centroids and π from the round; the domain weights stay as they are (``prev``)."""
        fit = self._fit(snap, info)
        if fit is None:
            info.setdefault("fallback", "no usable statistics")
            log.warning("%s step %d: keeping the previous cluster weights (%s)", self.name, info["step"],
                        info["fallback"])
        else:
            ne = fit.sizes > 0
            pi = fit.pi[ne] / fit.pi[ne].sum()
            if len(pi) * self.min_weight <= 1:
                pi = simplex.floor(pi, self.min_weight)
            q = fit.sizes[ne] / fit.sizes[ne].sum()
            self.set_clusters(fit.centers[ne], pi, q)
            info.update(cluster_weights=pi.tolist(), cluster_shares=q.tolist(), factors=(pi / q).tolist())
        return prev

    # ------------------------------------------------------------------ GradientReweighter
    @property
    def ready(self) -> bool:
        return self.centroids is not None

    def table_buffer(self, k: int) -> np.ndarray:
        """``[m, centroids (m_max x (k + 2): centroid, π, q) zero-padded]``: the cluster table in a buffer whose
        length depends only on the config and ``k`` (m = 0 before the first refresh)."""
        buf = np.zeros(1 + self.num_clusters() * (k + 2))
        if self.centroids is not None:
            m = self.centroids.shape[0]
            buf[0] = m
            buf[1:1 + m * (k + 2)] = np.concatenate([self.centroids, self.cluster_weights[:, None],
                                                     self.cluster_shares[:, None]], axis=1).reshape(-1)
        return buf

    def load_table_buffer(self, buf: np.ndarray, k: int) -> None:
        m = int(buf[0])
        t = np.asarray(buf[1:1 + m * (k + 2)]).reshape(m, k + 2)
        self.set_clusters(*((t[:, :k], t[:, k], t[:, k + 1]) if m else (None, None, None)))

    @torch.no_grad()
    def sample_factors(self, g: torch.Tensor) -> torch.Tensor | None:
        """``π_c / q_c`` of each row's nearest centroid (``g [B, k]`` projected per-sample gradients, the
        rows the statistics record); None before the first refresh. Ties go to the lowest cluster index."""
        if self.centroids is None:
            return None
        if g.dim() != 2 or g.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"g must be [B, {self.centroids.shape[1]}], got {tuple(g.shape)}")
        dev = g.device
        if self._device_cache is None or self._device_cache[0] != dev:
            # once per cluster table: a non-blocking copy of the (host) table to the rows' device
            C = torch.from_numpy(np.asarray(self.centroids, np.float32)).to(dev, non_blocking=True)
            fac = torch.from_numpy(np.asarray(self.factors, np.float32)).to(dev, non_blocking=True)
            self._device_cache = (dev, C, (C * C).sum(1), fac)
        _, C, csq, fac = self._device_cache
        x = g.detach().float()
        if self.cfg.dograph_cosine:
            nrm = x.norm(dim=1, keepdim=True)
            x = torch.where(nrm > 0, x / nrm.clamp_min(1e-30), torch.zeros_like(x))
        with no_autocast(dev):   # the nearest centroid in fp32, also under a caller's autocast
            return fac[(csq[None, :] - 2.0 * (x @ C.t())).argmin(dim=1)]

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["clusters"] = None if self.centroids is None else {
            "centroids": self.centroids.tolist(), "cluster_weights": self.cluster_weights.tolist(),
            "cluster_shares": self.cluster_shares.tolist()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        cl = sd.get("clusters") or {}
        self.set_clusters(cl.get("centroids"), cl.get("cluster_weights"), cl.get("cluster_shares"))

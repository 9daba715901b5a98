"""R&B *Balance* (arXiv 2505.00358, Alg. 1): ``p ← softmax(λ · G p / ‖G p‖)`` every K steps.

``G`` is the Gram matrix of per-domain **mean** last-layer gradients (here: their random projections,
``G_ij = ḡ_iᵀ ḡ_j`` with ``ḡ_i = sums_i / counts_i``, the paper's normalisation by ``|S_i||S_j|``).
So ``(G p)_i = ⟨ḡ_i, Σ_j p_j ḡ_j⟩``: a domain is up-weighted when its gradient aligns with the gradient
of the current mixture.

With held-out data (``snapshot.eval_sums``, ``cfg.rnb_use_eval``) the paper's evaluation variant is used:
``G_ij = ⟨ḡ_i^train, ḡ_j^eval⟩``, so ``(G p)_i = ⟨ḡ_i^train, Σ_j p_j ḡ_j^eval⟩``. When there are as many
eval groups as domains they are taken to be the same groups (weighted by p, as in the paper);
otherwise the eval groups are weighted uniformly. Eval means use ``snapshot.extra["eval_counts"]``
when given (else the sums are used as they are).

Two strategies share this update:

- ``rnb`` follows the paper: no EMA and no floor unless the config sets ``mixing.ema`` /
  ``mixing.min_weight``. The paper starts from uniform weights (``mixture.kind=uniform``).
- ``rnb-damped`` is megamix's damped variant: EMA 0.5 and a 0.02 floor by default. It trades the
  paper's fast moves for stability when rounds are short and the statistics noisy.

Guards the paper lacks, applied by both (see :mod:`megamix.strategies.base`): domains with fewer than
``cfg.min_count`` samples (their ``ḡ_i`` is 0/0, the paper's NaN) keep their previous weight and are
left out of ``Gp``; eval groups without points are dropped from the target; a zero or non-finite ``Gp``
keeps the previous weights and records why; with a prior's ``max_drift``, the drift bound.

Options: ``cfg.rnb_lambda`` (λ), ``cfg.rnb_normalize`` (divide by ‖Gp‖), ``cfg.rnb_use_eval``.
"""
from __future__ import annotations

import numpy as np

from megamix.simplex import softmax
from megamix.snapshot import StatsSnapshot
from megamix.strategies.base import MixingStrategy, no_signal

__all__ = ["RnBStrategy", "RnBDampedStrategy", "rnb_balance"]


def rnb_balance(means: np.ndarray, p: np.ndarray, lam: float, normalize: bool = True,
                target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One R&B Balance update on a set of domains.

    Args:
        means: ``[D, k]`` mean gradient per domain.
        p: ``[D]`` current weights (the ``p`` in ``G p``).
        lam: λ, a multiplier of the normalised ``Gp`` (an inverse temperature): larger is sharper.
        normalize: divide ``G p`` by its norm (paper default).
        target: optional ``[k]`` vector replacing ``Σ_j p_j ḡ_j`` (the eval variant).

    Returns:
        ``(new_p, Gp)``. Raises ``FloatingPointError`` when ``Gp`` is zero or not finite.
    """
    means = np.asarray(means, np.float64)
    p = np.asarray(p, np.float64)
    t = p @ means if target is None else np.asarray(target, np.float64)
    gp = means @ t
    problem = no_signal(gp, "Gp")
    if problem:
        raise FloatingPointError(problem)
    norm = float(np.linalg.norm(gp))
    z = lam * gp / norm if normalize else lam * gp
    return softmax(z), gp


class RnBStrategy(MixingStrategy):
    """R&B Balance over the loader's domains, as the paper runs it: no EMA, no floor (use
    ``megamix regroup`` first for the Regroup stage)."""

    name = "rnb"
    default_ema = 0.0
    default_min_weight = 0.0

    def _raw_update(self, snap: StatsSnapshot, current: np.ndarray, info: dict):
        d = len(self.domain_names)
        counts = np.asarray(snap.counts, np.float64)
        active = self.count_mask(counts)
        sums = np.asarray(snap.sums, np.float64)
        row_ok = np.all(np.isfinite(sums), axis=1)
        active &= row_ok
        if not active.any():
            info["fallback"] = (f"no domain reached min_count={self.cfg.min_count} samples with finite "
                                f"gradients this round (counts {counts.astype(int).tolist()})")
            return None
        means = np.where(active[:, None], snap.means(), 0.0)
        p = current[active] / current[active].sum()
        target = None
        info["target"] = "train"
        if self.cfg.rnb_use_eval and snap.eval_sums is not None:
            target = self._eval_target(snap, current, info)
            if target is None:
                return None
        try:
            new_active, gp = rnb_balance(means[active], p, self.cfg.rnb_lambda,
                                         normalize=self.cfg.rnb_normalize, target=target)
        except FloatingPointError as e:
            info["fallback"] = str(e)
            return None
        proposed = np.zeros(d)
        proposed[active] = new_active
        full_gp = np.full(d, np.nan)
        full_gp[active] = gp
        info["gp"] = full_gp.tolist()
        info["gram"] = (means @ means.T).tolist()
        return proposed, active

    def _eval_target(self, snap: StatsSnapshot, current: np.ndarray, info: dict) -> np.ndarray | None:
        ev = np.asarray(snap.eval_sums, np.float64)
        if ev.ndim != 2 or ev.shape[1] != snap.sums.shape[1]:
            raise ValueError(f"eval_sums has shape {ev.shape}; expected [E, {snap.sums.shape[1]}]")
        ec = snap.extra.get("eval_counts")
        if ec is not None:
            ec = np.asarray(ec, np.float64).reshape(-1)
            if ec.shape[0] != ev.shape[0]:
                raise ValueError(f"extra['eval_counts'] has {ec.shape[0]} entries for {ev.shape[0]} "
                                 "eval groups")
            ok = (ec > 0) & np.all(np.isfinite(ev), axis=1)
            ev_means = np.zeros_like(ev)
            ev_means[ok] = ev[ok] / ec[ok, None]
        else:
            ok = np.all(np.isfinite(ev), axis=1)
            ev_means = ev
        dropped = int((~ok).sum())
        if dropped:
            info["eval_dropped"] = dropped
        if not ok.any():
            info["fallback"] = "every eval group is empty or non-finite, so Gp is undefined (NaN)"
            return None
        if ev.shape[0] == len(self.domain_names):
            q = current * ok
        else:
            q = ok.astype(np.float64)
        info["target"] = "eval"
        return (q / q.sum()) @ ev_means


class RnBDampedStrategy(RnBStrategy):
    """R&B Balance with damping: EMA 0.5 and a 0.02 floor unless the config sets them."""

    name = "rnb-damped"
    default_ema = 0.5
    default_min_weight = 0.02

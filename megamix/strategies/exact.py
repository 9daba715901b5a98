"""Exact mode: strategies fed with unprojected per-sample LM-head gradients.

For a linear LM head ``logits_t = W a_t`` with cross-entropy, the gradient of sample i w.r.t. ``W``
is ``G_i = Σ_{t∈i} δ_t a_tᵀ`` (``[V, d]``) with ``δ_t = s·(softmax(W a_t) − onehot(y_t))`` and ``s`` the
loss scaling (``1/#valid tokens`` for a mean loss). Flattening ``G_i`` gives the exact per-sample
statistic that the kernels' projection ``P1 G_i P2ᵀ`` approximates. Only practical for tiny V·d; used
to check that projected statistics give the same weights.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megamix.snapshot import StatsSnapshot

__all__ = ["exact_lm_head_grads", "snapshot_from_per_sample"]


def exact_lm_head_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        sample_index: torch.Tensor, num_samples: int, *, ignore_index: int = -100,
                        reduction: str = "mean") -> torch.Tensor:
    """Per-sample gradients ``[num_samples, V, d]`` of the LM-head cross-entropy w.r.t. ``weight``.

    Args:
        hidden: ``[N, d]`` inputs of the LM head (one row per token).
        weight: ``[V, d]`` LM-head weight.
        labels: ``[N]`` next-token ids (``ignore_index`` = no loss).
        sample_index: ``[N]`` which sample each token belongs to (0..num_samples-1).
        reduction: ``"mean"`` over valid tokens (the training loss) or ``"sum"``.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes hidden {tuple(hidden.shape)} / weight {tuple(weight.shape)} mismatch")
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum'")
    h = hidden.double()
    w = weight.double()
    valid = labels != ignore_index
    probs = torch.softmax(h @ w.t(), dim=-1)
    delta = probs.clone()
    rows = torch.nonzero(valid).squeeze(1)
    delta[rows, labels[rows]] -= 1.0
    delta[~valid] = 0.0
    if reduction == "mean":
        delta /= max(int(valid.sum()), 1)
    # one-hot [B, N] sample membership: G = Σ_t onehot_t ⊗ δ_t a_tᵀ as a batched matmul
    member = torch.zeros(num_samples, h.shape[0], dtype=torch.float64)
    member[sample_index.long(), torch.arange(h.shape[0])] = 1.0
    return torch.einsum("bn,nv,nd->bvd", member, delta, h)


def snapshot_from_per_sample(g: np.ndarray, domain_ids: np.ndarray, domain_names: Sequence[str],
                             step: int = 0, *, keep_per_sample: bool = True,
                             per_sample_loss: np.ndarray | None = None,
                             eval_g: np.ndarray | None = None,
                             eval_domain_ids: np.ndarray | None = None) -> StatsSnapshot:
    """Build a :class:`StatsSnapshot` from per-sample gradient rows ``g [n, k]`` and their domains.

    ``eval_g``/``eval_domain_ids`` (optional) give held-out per-sample rows grouped into
    ``eval_sums [D, k]`` with ``extra["eval_counts"]``. ``per_sample_loss`` ([n]) fills ``domain_loss``
    and ``extra["per_sample_loss"]``.
    """
    g = np.asarray(g, np.float64)
    dom = np.asarray(domain_ids, np.int64)
    d = len(domain_names)
    if g.ndim != 2 or dom.shape != (g.shape[0],):
        raise ValueError(f"g {g.shape} and domain_ids {dom.shape} do not match")
    if len(dom) and (dom.min() < 0 or dom.max() >= d):
        raise ValueError(f"domain ids must be in [0, {d})")
    counts = np.bincount(dom, minlength=d).astype(np.float64)
    sums = np.zeros((d, g.shape[1]))
    np.add.at(sums, dom, g)
    extra: dict = {}
    loss = np.full(d, np.nan)
    if per_sample_loss is not None:
        pl = np.asarray(per_sample_loss, np.float64)
        tot = np.bincount(dom, weights=pl, minlength=d)
        loss = np.where(counts > 0, tot / np.maximum(counts, 1), np.nan)
        extra["per_sample_loss"] = pl
    ev = None
    if eval_g is not None:
        eg = np.asarray(eval_g, np.float64)
        ed = np.asarray(eval_domain_ids, np.int64)
        ev = np.zeros((d, g.shape[1]))
        np.add.at(ev, ed, eg)
        extra["eval_counts"] = np.bincount(ed, minlength=d).astype(np.float64)
    return StatsSnapshot(step=int(step), domain_names=list(domain_names), counts=counts, sums=sums,
                         gram=sums @ sums.T, domain_loss=loss,
                         per_sample=g if keep_per_sample else None,
                         per_sample_domain=dom if keep_per_sample else None, eval_sums=ev, extra=extra)

"""Projected per-sample gradients for a vocab-parallel (tensor-parallel) LM head.

With Megatron-style tensor parallelism each TP rank ``r`` holds a vocab shard ``W_r = W[s_r:e_r]``
and computes only its logits shard ``z_r = a W_rᵀ``. The softmax is distributed (max and sum-exp are
all-reduced over the TP group), so each rank's ``dL/dz_r = δ_r`` is exactly the ``[s_r:e_r]`` slice
of the unsharded ``δ``. Hence

    u = δ P1ᵀ = Σ_r δ_r P1[:, s_r:e_r]ᵀ        (an all-reduce SUM over the TP group)
    w = a P2ᵀ                                   (``a`` is replicated across TP ranks)
    g_i = Σ_t u_t w_tᵀ                          (identical on every TP rank)

:func:`vocab_parallel_capture` attaches an :class:`~megamix.integrations.capture.LMHeadGradCapture`
to the shard with the matching slice of ``P1`` and the all-reduce of ``u``. It reads ``δ_r`` from
whatever vocab-parallel loss the model uses (Megatron's ``vocab_parallel_cross_entropy``, or
:func:`vocab_parallel_cross_entropy` here). All TP ranks must run the backward together (they do in
Megatron), because the capture all-reduces inside it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kernels.projection import Projection
from megamix.integrations.hook import GradCallback, LMHeadGradCapture


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """``[start, end)`` of TP rank ``tp_rank``'s vocab shard (Megatron's equal split).

    ``vocab_size`` must be the padded vocabulary (divisible by ``tp_size``), as Megatron pads it.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel position rank={tp_rank} size={tp_size}")
    if vocab_size % tp_size != 0:
        raise ValueError(f"vocab size {vocab_size} is not divisible by the TP size {tp_size}; pad the "
                         "vocabulary (Megatron: --make-vocab-size-divisible-by) and build P1 for the padded size")
    per = vocab_size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy over vocab-sharded logits (distributed softmax)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: Any,
                ignore_index: int) -> torch.Tensor:
        z = logits.float()
        Vs = z.shape[-1]
        m = z.max(dim=-1).values
        _all_reduce(m, dist.ReduceOp.MAX, group)
        e = torch.exp(z - m.unsqueeze(-1))
        s = e.sum(dim=-1)
        _all_reduce(s, dist.ReduceOp.SUM, group)
        local = labels - vocab_start
        own = (local >= 0) & (local < Vs) & (labels != ignore_index)
        idx = torch.where(own, local, torch.zeros_like(local))
        zt = torch.gather(z, -1, idx.unsqueeze(-1)).squeeze(-1) * own
        _all_reduce(zt, dist.ReduceOp.SUM, group)
        valid = labels != ignore_index
        loss = (torch.log(s) + m - zt) * valid
        ctx.save_for_backward(e, s, idx, own, valid)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        e, s, idx, own, valid = ctx.saved_tensors
        grad = e / s.unsqueeze(-1)
        grad.scatter_add_(-1, idx.unsqueeze(-1), -own.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, *, vocab_start: int,
                                 group: Any = None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy ``[...]`` from this rank's logits shard ``[..., V/tp]``.

    Equal to ``F.cross_entropy(full_logits, labels, reduction="none")`` on every TP rank (0 on
    ignored tokens). Differentiable w.r.t. ``logits_shard``; its gradient is the rank's slice of
    the unsharded softmax gradient.
    """
    if logits_shard.shape[:-1] != labels.shape:
        raise ValueError(f"logits shard {tuple(logits_shard.shape)} and labels {tuple(labels.shape)} disagree")
    return _VocabParallelCE.apply(logits_shard, labels, int(vocab_start), group, int(ignore_index))


def vocab_parallel_capture(lm_head_shard: nn.Module | None, projection: Projection, callback: GradCallback, *,
                           vocab_start: int, vocab_end: int, group: Any = None,
                           chunk_tokens: int = 4096, seq_first: bool = False) -> LMHeadGradCapture:
    """Attach a capture to a vocab-parallel LM-head shard.

    Args:
        lm_head_shard: the module producing this rank's logits shard (e.g. Megatron's
            ``ColumnParallelLinear`` output layer, or an ``nn.Linear`` holding ``W[vocab_start:vocab_end]``).
        projection: the full projection (``P1 [k1, V_padded]``, ``P2 [k2, d]``), identical on all ranks.
        callback: ``callback(g, context)``; ``g [B, k1*k2]`` is the full (unsharded) projected per-sample
            gradient, identical on every TP rank.
        vocab_start, vocab_end: this rank's vocab range (see :func:`vocab_range`).
        group: the tensor-parallel process group (None = default group).
        seq_first: Megatron's ``[T, B, ...]`` layout.
        lm_head_shard may be None; then call ``capture.tap(hidden, logits_shard)`` in the forward.
    """
    V = projection.P1.shape[1]
    if not 0 <= vocab_start < vocab_end <= V:
        raise ValueError(f"vocab range [{vocab_start}, {vocab_end}) is outside P1's {V} columns")
    shard = Projection(projection.P1[:, vocab_start:vocab_end].contiguous(), projection.P2, projection.R,
                       projection.kind, projection.seed)

    def all_reduce_u(u: torch.Tensor) -> torch.Tensor:
        return _all_reduce(u.contiguous(), dist.ReduceOp.SUM, group)

    return LMHeadGradCapture(lm_head_shard, shard, callback, chunk_tokens=chunk_tokens, seq_first=seq_first,
                             u_transform=all_reduce_u)


__all__ = ["vocab_range", "vocab_parallel_cross_entropy", "vocab_parallel_capture"]

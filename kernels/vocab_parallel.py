"""The vocab-parallel CE pass (Megatron-style tensor parallelism) of the fused linear cross-entropy.

TP rank ``r`` holds the vocab shard ``W_r = W[s_r:e_r]`` and the replicated hidden states. Per chunk, its logits
shard ``x W_rᵀ`` goes through two passes with collectives in between (:func:`ce_vocab_parallel`)::

    pass A (stats):  local row max m_r, sum-exp S_r = Σ exp(z - m_r), target logit if r owns the label
    all-reduce:      m = MAX_r m_r;  S = Σ_r S_r exp(m_r - m) and z_y = Σ_r z_y,r  (one SUM of both)
    pass B (δ):      lse = m + log S;  δ_r = s (exp(z - lse) - onehot_r) in place;  u_r = δ_r P1[:, s_r:e_r]ᵀ

then the driver (:func:`megamix.kernels.fused_linear_ce.vocab_parallel_fused_linear_cross_entropy`) forms
``dX_r = δ_r W_r`` and ``dW_r += δ_rᵀ x``; after the last chunk ``u = Σ_r u_r`` and (by default) ``dX = Σ_r dX_r``
are all-reduced over the TP group once. ``w = x P2ᵀ`` needs no communication. Pass A is the first sweep of the
single-device kernel and pass B its second sweep (the ``@triton.jit`` helpers of :mod:`megamix.kernels.ce_pass`),
so the single-device kernel is unchanged.

Layout: reference (the distributed softmax, an autograd.Function) → Triton kernels → launchers (own the checks)
and their torch twins → the CE pass of a TP rank.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from megamix.kernels.ce_pass import _ce_launch, _check_ce_args, _check_triton_dtype, _finish_delta, scale_tensor
from megamix.kernels.utils import HAS_TRITON, all_reduce_, cdiv, tl, triton

if HAS_TRITON:
    from megamix.kernels.ce_pass import _delta_sweep, _row_max_sumexp


class VocabShard(NamedTuple):
    """Where a vocab-parallel call's weight sits: rows ``[start, start + V_r)`` of the full LM head, the
    TP process group, and whether ``dX`` is all-reduced over it (see
    :func:`~megamix.kernels.fused_linear_ce.vocab_parallel_fused_linear_cross_entropy`)."""

    start: int
    group: Any
    reduce_dx: bool


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
class _VocabParallelCERef(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded logits with a distributed softmax (max, sum-exp and the
    target logit all-reduced over the TP group); backward is this shard's slice of softmax - onehot."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, ignore_index):
        z = logits.float()
        m = all_reduce_(z.max(dim=-1).values, "max", group)
        e = torch.exp(z - m.unsqueeze(-1))
        total = all_reduce_(e.sum(dim=-1), "sum", group)
        local = labels - vocab_start
        own = (labels != ignore_index) & (local >= 0) & (local < z.shape[-1])
        col = torch.where(own, local, torch.zeros_like(local))
        zy = all_reduce_(z.gather(-1, col.unsqueeze(-1)).squeeze(-1) * own, "sum", group)
        valid = labels != ignore_index
        ctx.save_for_backward(e, total, col, own, valid)
        ctx.in_dtype = logits.dtype
        return (torch.log(total) + m - zy) * valid

    @staticmethod
    def backward(ctx, grad_loss):
        e, total, col, own, valid = ctx.saved_tensors
        grad = e / total.unsqueeze(-1)
        grad.scatter_add_(-1, col.unsqueeze(-1), -own.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy_ref(logits_shard: torch.Tensor, labels: torch.Tensor, *, vocab_start: int,
                                     group: Any = None, ignore_index: int = -100) -> torch.Tensor:
    """Reference of the distributed softmax: per-token loss ``[...]`` from this TP rank's logits shard
    ``[..., V_r]`` (columns ``vocab_start : vocab_start + V_r`` of the full logits).

    Equals ``F.cross_entropy(full_logits, labels, reduction="none")`` on every rank (0 where ignored) and
    is differentiable w.r.t. ``logits_shard`` (the gradient is the shard's slice of the unsharded one),
    like Megatron's ``vocab_parallel_cross_entropy``. Every rank of ``group`` must call it together.
    """
    if logits_shard.shape[:-1] != labels.shape:
        raise ValueError(f"logits_shard {tuple(logits_shard.shape)} and labels {tuple(labels.shape)} disagree: "
                         "labels must have the logits' leading shape")
    return _VocabParallelCERef.apply(logits_shard, labels, int(vocab_start), group, int(ignore_index))


# ----------------------------------------------------------------------------------------------
# Triton kernels: pass A (_ce_shard_stats_kernel) and pass B (_ce_shard_delta_kernel), the two sweeps of
# the single-device kernel (ce_pass.py) with the TP all-reduces in between
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _shard_label(labels_ptr, rows, rmask, vocab_start, V, ignore_index):
        """(valid, local column) of BM labels for the vocab shard [vocab_start, vocab_start + V); the
        column is -1 where the label is ignored or owned by another shard."""
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
        valid = rmask & (y != ignore_index)
        local = y - vocab_start
        own = valid & (local >= 0) & (local < V)
        return valid, tl.where(own, local, -1)

    @triton.jit
    def _ce_shard_stats_kernel(logits_ptr, stride_l, labels_ptr, max_ptr, sumexp_ptr, zy_ptr,
                               C, V, vocab_start, ignore_index, BM: tl.constexpr, BV: tl.constexpr):
        """Vocab-parallel pass A over a logits shard: per row local max, Σ exp(z - max), and the target
        logit where this shard owns the label (0 elsewhere)."""
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < C
        row_base = logits_ptr + rows.to(tl.int64) * stride_l
        _, local = _shard_label(labels_ptr, rows, rmask, vocab_start, V, ignore_index)
        zy = tl.load(row_base + local, mask=local >= 0, other=0.0).to(tl.float32)
        m, s = _row_max_sumexp(row_base, rmask, V, BM, BV)
        tl.store(max_ptr + rows, m, mask=rmask)
        tl.store(sumexp_ptr + rows, s, mask=rmask)
        tl.store(zy_ptr + rows, zy, mask=rmask)

    @triton.jit
    def _ce_shard_delta_kernel(logits_ptr, stride_l, labels_ptr, lse_ptr, p1t_ptr, stride_p, u_ptr, stride_u,
                               C, V, K1, vocab_start, scale_ptr, p1_scale, ignore_index,
                               HAS_PROJ: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
                               BK1: tl.constexpr, DOT_IEEE: tl.constexpr):
        """Vocab-parallel pass B: δ from the global lse written over the shard; u_r = δ_r P1_rᵀ."""
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        row_base = logits_ptr + rows64 * stride_l
        valid, local = _shard_label(labels_ptr, rows, rmask, vocab_start, V, ignore_index)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        u_acc = _delta_sweep(row_base, rmask, local, lse, tl.where(valid, tl.load(scale_ptr), 0.0), p1t_ptr, stride_p, V,
                             K1, HAS_PROJ, BM, BV, BK1, DOT_IEEE)
        if HAS_PROJ:
            kcols = tl.arange(0, BK1)
            tl.store(u_ptr + rows64[:, None] * stride_u + kcols[None, :], u_acc * p1_scale,
                     mask=rmask[:, None] & (kcols < K1)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (own the shape / dtype checks) and their torch twins
# ----------------------------------------------------------------------------------------------
def _shard_labels(labels: torch.Tensor, vocab_start: int, V: int, ignore_index: int):
    """(valid, owned, local column clamped to 0 where not owned) for the shard [vocab_start, vocab_start+V)."""
    valid = labels != ignore_index
    local = labels - vocab_start
    own = valid & (local >= 0) & (local < V)
    return valid, own, torch.where(own, local, torch.zeros_like(local))


def ce_shard_stats_triton(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int, *,
                          block_m: int | None = None, block_v: int | None = None, num_warps: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass A on a logits shard ``[C, V_r]`` (read only): ``(max [C], Σ exp(z - max) [C], target logit [C])``
    in fp32; the target logit is 0 on rows whose label this shard does not own."""
    _check_ce_args(logits, labels, None)
    _check_triton_dtype(logits)
    C, V = logits.shape
    stats = torch.empty(3, C, device=logits.device, dtype=torch.float32)
    _, args = _ce_launch(logits, None, stats[0], block_m, block_v, num_warps)
    tiles = {k: args[k] for k in ("BM", "BV", "num_warps", "num_stages") if k in args}
    if C > 0:
        _ce_shard_stats_kernel[(cdiv(C, tiles["BM"]),)](logits, logits.stride(0), labels, stats[0], stats[1],
                                                        stats[2], C, V, int(vocab_start), int(ignore_index), **tiles)
    return stats[0], stats[1], stats[2]


def ce_shard_stats_torch(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch pass A with the same contract as :func:`ce_shard_stats_triton`."""
    _check_ce_args(logits, labels, None)
    z = logits.float()
    _, own, col = _shard_labels(labels, vocab_start, z.shape[1], ignore_index)
    m = z.max(dim=1).values
    sumexp = torch.exp(z - m[:, None]).sum(dim=1)
    zy = z.gather(1, col[:, None]).squeeze(1) * own
    return m, sumexp, zy


def ce_shard_delta_triton(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: float | torch.Tensor,
                          vocab_start: int, ignore_index: int, p1t: torch.Tensor | None = None,
                          p1_scale: float = 1.0, *, block_m: int | None = None, block_v: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor | None:
    """Pass B: overwrite the logits shard ``[C, V_r]`` with δ_r from the global ``lse [C]`` (fp32); return
    the partial ``u_r = δ_r P1_rᵀ [C, k1]`` fp32 (``p1t`` = the shard's rows of P1ᵀ) or None."""
    _check_ce_args(logits, labels, p1t)
    _check_triton_dtype(logits)
    if lse.shape != (logits.shape[0],) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [C={logits.shape[0]}], got {lse.dtype} {tuple(lse.shape)}")
    C, V = logits.shape
    lse = lse.contiguous()
    u, args = _ce_launch(logits, p1t, lse, block_m, block_v, num_warps)
    if C > 0:
        _ce_shard_delta_kernel[(cdiv(C, args["BM"]),)](
            logits, logits.stride(0), labels, lse, C=C, V=V, vocab_start=int(vocab_start),
            scale_ptr=scale_tensor(scale, logits.device), p1_scale=float(p1_scale), ignore_index=int(ignore_index),
            **args)
    return u


def ce_shard_delta_torch(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: float,
                         vocab_start: int, ignore_index: int, p1t: torch.Tensor | None = None,
                         p1_scale: float = 1.0) -> torch.Tensor | None:
    """Pure-torch pass B with the same contract as :func:`ce_shard_delta_triton`."""
    _check_ce_args(logits, labels, p1t)
    z = logits.float()
    valid, own, col = _shard_labels(labels, vocab_start, z.shape[1], ignore_index)
    return _delta_and_u_torch(logits, z, lse, col, own, valid, scale, p1t, p1_scale)


def _delta_and_u_torch(logits: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                       hit: torch.Tensor, valid: torch.Tensor, scale: float, p1t: torch.Tensor | None,
                       p1_scale: float) -> torch.Tensor | None:
    """Turn ``z`` (fp32 view or copy of ``logits``) into δ = scale·valid·(exp(z - lse) - onehot) in place,
    the onehot at column ``target`` of rows where ``hit``; store δ in ``logits``; return u = δ P1ᵀ."""
    z.sub_(lse[:, None]).exp_()
    return _finish_delta(logits, z, target, hit, valid, scale, p1t, p1_scale)


def ce_vocab_parallel(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                      p1t: torch.Tensor | None = None, p1_scale: float = 1.0, *, vocab_start: int,
                      group: Any = None, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CE pass of a TP rank on its logits shard: pass A, the TP all-reduces (MAX of the row max, then
    one SUM of the rescaled sum-exp and the target logit), pass B. Returns (token_loss [C] fp32, identical
    on every rank; this rank's partial u_r [C, k1] fp32 | None). Every rank of ``group`` must call it."""
    stats, delta = ((ce_shard_stats_triton, ce_shard_delta_triton) if backend == "triton"
                    else (ce_shard_stats_torch, ce_shard_delta_torch))
    m, sumexp, zy = stats(logits, labels, vocab_start, ignore_index)
    m_all = all_reduce_(m.clone(), "max", group)
    summed = all_reduce_(torch.stack([sumexp * torch.exp(m - m_all), zy]), "sum", group)
    lse = m_all + torch.log(summed[0].clamp_min(1e-30))
    token_loss = torch.where(labels != ignore_index, lse - summed[1], torch.zeros_like(lse))
    return token_loss, delta(logits, labels, lse, scale, vocab_start, ignore_index, p1t, p1_scale)


__all__ = ["VocabShard", "vocab_parallel_cross_entropy_ref", "ce_shard_stats_triton", "ce_shard_stats_torch",
           "ce_shard_delta_triton", "ce_shard_delta_torch", "ce_vocab_parallel"]

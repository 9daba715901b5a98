"""Chunked fused linear cross-entropy that also emits factored gradient projections.

For hidden states ``a_t`` (rows of ``hidden [N,d]``), LM head ``W [V,d]`` and labels ``y_t``::

    z_t = W a_t,   δ_t = s_t (softmax(z_t) - onehot(y_t)),   s_t = scale (1/n_valid or 1), 0 if ignored
    loss = Σ_t s_t (lse(z_t) - z_t[y_t]),  dX_t = Wᵀ δ_t,  dW = Σ_t δ_t a_tᵀ
    u_t = P1 δ_t  [k1],   w_t = P2 a_t  [k2]

so that the projected per-sample gradient is ``g_i = Σ_{t∈i} u_t w_tᵀ = P1 G_i P2ᵀ``.

Per-row loss weights (``row_weights``, DoGraph's in-step reweighting): ``loss = Σ_t r_t s_t ℓ_t``, so
``dX_t = r_t Wᵀ δ_t`` and ``dW = Σ_t δ_t (r_t a_t)ᵀ``; ``u`` and ``token_loss`` stay those of the
unweighted loss. The weights may be a tensor known up front, or a function of the projections
``r = f(start, end, u[start:end], w[start:end])`` called once per chunk after its CE pass and before
its dX/dW GEMMs; chunks are then cut at multiples of ``row_group`` rows, so a group (a sample) is
complete when its weights are asked for. When one group is longer than ``chunk_tokens`` the weights
are asked for all rows after a first pass (CE + projections, no dX/dW) and a second pass recomputes the
chunks' logits with the weights known (one more logits GEMM and CE pass). The weights scale the
``[C, d]`` rows of ``x`` before the dW GEMM and of dX after its GEMM; δ itself and the CE kernels are
untouched, and without ``row_weights`` the driver runs exactly as before.

The forward walks the tokens in chunks of ``chunk_tokens``: logits chunk = ``x @ Wᵀ`` (torch.mm),
then one CE pass turns the logits into δ *in place* (online log-sum-exp, loss, and — when a
projection is given — ``u = δ P1ᵀ`` accumulated with ``tl.dot`` over V tiles inside the same pass),
then ``dX = δ W`` and ``dW += δᵀ x`` (torch.mm / addmm). Gradients are computed in the forward and
rescaled by ``grad_output`` in the backward, so the full ``N×V`` logits never exist and nothing but
``dX``/``dW`` is saved. The projection only *reads* δ, so training gradients are bit-identical with
the projection on or off.

Four places can compute ``u = δ P1ᵀ`` (``u_method``, :data:`U_METHODS`); the logits GEMM, the CE pass
that writes δ and the dW GEMM are the same code for all four, so δ, the loss and dW never depend on it:

- ``fused`` (default): inside the CE pass above; every 16-row program streams all of P1ᵀ.
- ``gemm``: the CE pass without P1, then one GEMM ``δ_chunk @ P1ᵀ`` (cuBLAS with an fp32 output on CUDA):
  one more read of the δ chunk.
- ``augmented``: ``W_aug = [W | P1ᵀ]`` (``[V, d+k1]``, built once per call: one extra copy of W in memory)
  and one GEMM ``δ @ W_aug = [dX | u]``: no extra pass over δ and k1/d more FLOPs in the dX GEMM; u comes out
  in the GEMM's dtype (bf16 in bf16 training). The wider GEMM may pick another kernel, so dX may differ from
  the other methods in its last bits (within the tolerance table). Without a dX GEMM (no grad, or pass 1 of
  the two-pass row-weight path) it computes u like ``gemm``.
- ``tiled``: the CE pass without P1, then :func:`proj_u_triton`: 128-row tiles (P1ᵀ streamed once per 128
  rows) and V split across programs, fp32 partials summed in a fixed order (Triton backend only).

Which is fastest depends on the GPU; ``kernels/bench/bench_fused_lce.py --u-methods`` measures them side by
side against the step's three-GEMM floor (``kernels/bench/results/SUMMARY.md``).

Vocab-parallel variant (:func:`vocab_parallel_fused_linear_cross_entropy`, Megatron-style tensor
parallelism): TP rank ``r`` holds the vocab shard ``W_r = W[s_r:e_r]`` and the replicated hidden states.
Per chunk, its logits shard ``x W_rᵀ`` goes through two passes with collectives in between:

    pass A (stats):  local row max m_r, sum-exp S_r = Σ exp(z - m_r), target logit if r owns the label
    all-reduce:      m = MAX_r m_r;  S = Σ_r S_r exp(m_r - m) and z_y = Σ_r z_y,r  (one SUM of both)
    pass B (δ):      lse = m + log S;  δ_r = s (exp(z - lse) - onehot_r) in place;  u_r = δ_r P1[:, s_r:e_r]ᵀ

then ``dX_r = δ_r W_r`` and ``dW_r += δ_rᵀ x``. After the last chunk ``u = Σ_r u_r`` and (by default)
``dX = Σ_r dX_r`` are all-reduced over the TP group once. ``w = x P2ᵀ`` needs no communication. Pass A is
the first sweep of the single-device kernel and pass B its second sweep (shared ``@triton.jit``
helpers), so the single-device kernel is unchanged.

Layout of this file: references → Triton kernels → launchers → chunked driver (both variants) →
autograd.Function → public :func:`fused_linear_cross_entropy` and
:func:`vocab_parallel_fused_linear_cross_entropy`.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from megamix.kernels import launch_configs
from megamix.kernels.projection import Projection, accumulate_mm_, mm_fp32
from megamix.kernels.utils import (HAS_TRITON, all_reduce_, cdiv, group_size, interpreting, next_pow2, resolve_backend,
                           tl, triton)

REDUCTIONS = ("mean", "sum")
#: Where ``u = δ P1ᵀ`` is computed (δ, the loss, dX and dW are the same for all four, see the module docstring):
#: ``fused`` inside the CE pass (``tl.dot`` over V tiles, 16-row programs); ``gemm`` one more GEMM on each δ chunk
#: (cuBLAS, fp32 output); ``augmented`` as extra columns of the dX GEMM, ``δ [W | P1ᵀ] = [dX | u]``; ``tiled``
#: a Triton kernel over each δ chunk with 128-row tiles and V split across programs (Triton backend only).
U_METHODS = ("fused", "gemm", "augmented", "tiled")
_PAD_V_ON_CPU = False  # tests flip this to exercise the CUDA-only V padding on CPU


class LinearCEOutput(NamedTuple):
    """Result of :func:`fused_linear_cross_entropy`.

    loss: scalar (differentiable); token_loss ``[N]`` fp32 unscaled per-token CE (0 where ignored,
    detached); u ``[N,k1]`` fp32 = P1 δ_t (includes the loss scaling, 0 where ignored) or None;
    w ``[N,k2]`` fp32 = P2 a_t or None.
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    u: torch.Tensor | None
    w: torch.Tensor | None


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   projection: Projection | None = None,
                                   row_weights: torch.Tensor | None = None) -> LinearCEOutput:
    """Exact reference in fp32: full logits + ``F.cross_entropy`` + explicit δ and materialised
    projection. Differentiable through autograd. ``row_weights [N]`` weights each token's loss
    (``Σ_t r_t ℓ_t``, divided by the number of valid tokens for ``mean``); ``u`` stays unweighted."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    logits = hidden.float() @ weight.float().t()
    if row_weights is None:
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    else:
        per_tok = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
        total = (per_tok * row_weights.reshape(-1).float().to(per_tok.device)).sum()
        loss = total / int((labels != ignore_index).sum()) if reduction == "mean" else total
    token_loss = F.cross_entropy(logits.detach(), labels, ignore_index=ignore_index, reduction="none")
    u = w = None
    if projection is not None:
        valid = labels != ignore_index
        n_valid = int(valid.sum())
        scale = 1.0 / n_valid if (reduction == "mean" and n_valid > 0) else (1.0 if reduction == "sum" else 0.0)
        delta = torch.softmax(logits.detach(), dim=-1)
        rows = torch.nonzero(valid).squeeze(1)
        delta[rows, labels[rows]] -= 1.0
        delta = delta * (valid.float() * scale)[:, None]
        u = delta @ projection.P1.float().to(delta.device).t()
        w = hidden.detach().float() @ projection.P2.float().to(hidden.device).t()
    return LinearCEOutput(loss, token_loss, u, w)


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
# Triton kernels. The two sweeps over V are @triton.jit helpers (inlined by the compiler):
#   _row_max_sumexp: online max / sum-exp of BM rows;  _delta_sweep: δ in place (+ u = δ P1ᵀ).
# _ce_delta_proj_kernel (single device) runs both; the vocab-parallel path runs them as two kernels
# (_ce_shard_stats_kernel, _ce_shard_delta_kernel) with the TP all-reduces in between.
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _row_max_sumexp(row_base, rmask, V, BM: tl.constexpr, BV: tl.constexpr):
        """Online max ``m`` and ``Σ exp(z - m)`` of BM logits rows (fp32)."""
        m = tl.full([BM], -1e30, tl.float32)
        s = tl.zeros([BM], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            msk = rmask[:, None] & (cols < V)[None, :]
            z = tl.load(row_base[:, None] + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        return m, s

    @triton.jit
    def _delta_sweep(row_base, rmask, y, lse, row_scale, p1t_ptr, stride_p, V, K1,
                     HAS_PROJ: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK1: tl.constexpr,
                     DOT_IEEE: tl.constexpr):
        """Overwrite BM logits rows with δ = row_scale (exp(z - lse) - onehot(y)) (a ``y`` outside
        [0, V) gives no onehot) and return ``u = δ P1ᵀ`` ([BM, BK1] fp32, unscaled; zeros without HAS_PROJ)."""
        kcols = tl.arange(0, BK1)
        u_acc = tl.zeros([BM, BK1], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < V
            msk = rmask[:, None] & cmask[None, :]
            ptrs = row_base[:, None] + cols[None, :]
            z = tl.load(ptrs, mask=msk, other=float("-inf")).to(tl.float32)
            p = tl.exp(z - lse[:, None])
            dlt = tl.where(cols[None, :] == y[:, None], p - 1.0, p) * row_scale[:, None]
            dlt = tl.where(msk, dlt, 0.0)
            tl.store(ptrs, dlt.to(ptrs.dtype.element_ty), mask=msk)
            if HAS_PROJ:
                pt = tl.load(p1t_ptr + cols[:, None].to(tl.int64) * stride_p + kcols[None, :],
                             mask=cmask[:, None] & (kcols < K1)[None, :], other=0.0)
                if DOT_IEEE:
                    u_acc = tl.dot(dlt.to(pt.dtype), pt, u_acc, input_precision="ieee")
                else:
                    u_acc = tl.dot(dlt.to(pt.dtype), pt, u_acc)
        return u_acc

    @triton.jit
    def _ce_delta_proj_kernel(logits_ptr, stride_l, labels_ptr, loss_ptr, p1t_ptr, stride_p, u_ptr, stride_u,
                              C, V, K1, scale_ptr, p1_scale, ignore_index,
                              HAS_PROJ: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
                              BK1: tl.constexpr, DOT_IEEE: tl.constexpr, BV_STATS: tl.constexpr):
        """One program owns BM rows of the chunk and sweeps all of V twice (no atomics). The loss scale
        ``s`` is read from ``scale_ptr`` (an fp32 scalar on the device: 1/n_valid needs no host read).
        The first sweep (max / sum-exp) walks V in tiles of ``BV_STATS``, the projection-off tile, also when a
        large k1 makes the second sweep use narrower ``BV`` tiles: the log-sum-exp, hence δ and the training
        gradients, stay bit-identical with the projection on or off (the δ of the second sweep is elementwise).

        Pass 1: online max / sum-exp -> lse; the target logit is read directly.
        Pass 2: δ = s (exp(z - lse) - onehot) stored over z; if HAS_PROJ, u += δ_tile @ P1ᵀ_tile."""
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
        valid = rmask & (y != ignore_index)
        row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        row_base = logits_ptr + rows64 * stride_l

        zy = tl.load(row_base + y, mask=valid, other=0.0).to(tl.float32)
        m, s = _row_max_sumexp(row_base, rmask, V, BM, BV_STATS)
        lse = tl.where(rmask, m + tl.log(tl.maximum(s, 1e-30)), 0.0)
        tl.store(loss_ptr + rows, tl.where(valid, lse - zy, 0.0), mask=rmask)

        u_acc = _delta_sweep(row_base, rmask, y, lse, row_scale, p1t_ptr, stride_p, V, K1,
                             HAS_PROJ, BM, BV, BK1, DOT_IEEE)
        if HAS_PROJ:
            kcols = tl.arange(0, BK1)
            tl.store(u_ptr + rows64[:, None] * stride_u + kcols[None, :], u_acc * p1_scale,
                     mask=rmask[:, None] & (kcols < K1)[None, :])

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

    @triton.jit
    def _proj_u_kernel(delta_ptr, stride_d, p1t_ptr, stride_p, part_ptr, stride_ps, stride_pr,
                       C, V, K1, V_PER_SPLIT,
                       BM: tl.constexpr, BV: tl.constexpr, BK1: tl.constexpr, DOT_IEEE: tl.constexpr):
        """``u_method="tiled"``: partial ``δ[rows, vs:ve] @ P1ᵀ[vs:ve]`` of BM rows over one slice of V.

        Grid ``(row blocks, V slices)``; each program streams its slice of P1ᵀ once per BM rows (the fused
        CE pass streams all of P1ᵀ once per 16 rows) and writes an fp32 partial ``[BM, k1]`` of slice
        ``program_id(1)``; the launcher sums the slices in a fixed order (deterministic, no atomics)."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        kcols = tl.arange(0, BK1)
        kmask = kcols < K1
        row_base = delta_ptr + rows64 * stride_d
        v_lo = pid_s * V_PER_SPLIT
        v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
        acc = tl.zeros([BM, BK1], tl.float32)
        for v0 in range(v_lo, v_hi, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < v_hi
            dlt = tl.load(row_base[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            pt = tl.load(p1t_ptr + cols[:, None].to(tl.int64) * stride_p + kcols[None, :],
                         mask=cmask[:, None] & kmask[None, :], other=0.0)
            if DOT_IEEE:
                acc = tl.dot(dlt.to(pt.dtype), pt, acc, input_precision="ieee")
            else:
                acc = tl.dot(dlt.to(pt.dtype), pt, acc)
        tl.store(part_ptr + pid_s * stride_ps + rows64[:, None] * stride_pr + kcols[None, :], acc,
                 mask=rmask[:, None] & kmask[None, :])

    @triton.jit
    def _scale_kernel(x_ptr, n, s_ptr, BLOCK: tl.constexpr):
        """``x *= s`` in place, in fp32 (``s`` an fp32 scalar read from the device), rounded once to x's dtype:
        the backward's scaling of dX and dW by the loss gradient."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < n
        s = tl.load(s_ptr)
        x = tl.load(x_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * s).to(x_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------------------
# Launchers (own the shape / dtype checks)
# ----------------------------------------------------------------------------------------------
def _check_ce_args(logits: torch.Tensor, labels: torch.Tensor, p1t: torch.Tensor | None) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"CE pass needs a 2-D row-major logits chunk, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [C] with C={logits.shape[0]}, got {tuple(labels.shape)}")
    if p1t is not None and (p1t.dim() != 2 or p1t.shape[0] != logits.shape[1] or p1t.stride(1) != 1):
        raise ValueError(f"P1ᵀ must be a contiguous [V={logits.shape[1]}, k1] matrix, got {tuple(p1t.shape)}")


def _check_triton_dtype(logits: torch.Tensor) -> None:
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits dtype {logits.dtype} not supported (fp32, fp16, bf16)")


def scale_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The loss scale ``s`` as a 0-d fp32 tensor on ``device``. A Python float becomes a device fill (no host
    copy); a tensor (e.g. ``1/n_valid`` computed on the device) is used as is: neither needs a host sync."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"the loss scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(scale), device=device, dtype=torch.float32)


def _ce_launch(logits: torch.Tensor, p1t: torch.Tensor | None, dummy: torch.Tensor, block_m: int | None,
               block_v: int | None, num_warps: int | None) -> tuple[torch.Tensor | None, dict]:
    """(u output [C, k1] fp32 or None, the launch arguments of a CE pass kernel that depend on the tiles and the
    projection). Tiles, warps and stages come from :func:`megamix.kernels.launch_configs.ce_pass` (explicit
    ``block_m``/``block_v``/``num_warps`` override it, for the benchmarks' sweeps); without a projection the
    unused pointers are ``logits`` and the fp32 vector ``dummy``."""
    C = logits.shape[0]
    k1 = p1t.shape[1] if p1t is not None else 1
    interp = interpreting()
    cfg = launch_configs.ce_pass(C, logits.dtype, p1t.shape[1] if p1t is not None else None, interpret=interp)
    u = torch.empty(C, k1, device=logits.device, dtype=torch.float32) if p1t is not None else None
    u_arg = u if u is not None else dummy
    args = {"p1t_ptr": p1t if p1t is not None else logits, "stride_p": p1t.stride(0) if p1t is not None else 0,
            "u_ptr": u_arg, "stride_u": u_arg.stride(0), "K1": k1,
            "HAS_PROJ": p1t is not None, "BK1": next_pow2(k1, 16),
            "DOT_IEEE": p1t is None or p1t.dtype == torch.float32,
            "BM": block_m or cfg.block_m, "BV": block_v or cfg.block_v,
            "num_warps": cfg.num_warps if interp else (num_warps or cfg.num_warps)}
    if cfg.num_stages is not None and not interp:
        args["num_stages"] = cfg.num_stages
    return u, args


def ce_delta_triton(logits: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor, ignore_index: int,
                    p1t: torch.Tensor | None = None, p1_scale: float = 1.0, *,
                    block_m: int | None = None, block_v: int | None = None, num_warps: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton CE pass: overwrite ``logits [C,V]`` with δ; return (token_loss [C] fp32, u [C,k1] fp32 | None).
    ``scale``: the loss scale s (a float, or a scalar tensor on the device)."""
    _check_ce_args(logits, labels, p1t)
    _check_triton_dtype(logits)
    C, V = logits.shape
    loss = torch.empty(C, device=logits.device, dtype=torch.float32)
    u, args = _ce_launch(logits, p1t, loss, block_m, block_v, num_warps)
    # the max / sum-exp sweep keeps the projection-off tile (see the kernel), unless a sweep overrides the tile
    bv_stats = block_v or launch_configs.ce_pass(C, logits.dtype, None, interpret=interpreting()).block_v
    if C > 0:
        _ce_delta_proj_kernel[(cdiv(C, args["BM"]),)](
            logits, logits.stride(0), labels, loss, C=C, V=V, scale_ptr=scale_tensor(scale, logits.device),
            p1_scale=float(p1_scale), ignore_index=int(ignore_index), BV_STATS=bv_stats, **args)
    return loss, u


def proj_u_triton(delta: torch.Tensor, p1t: torch.Tensor, p1_scale: float = 1.0, *, block_m: int | None = None,
                  block_v: int | None = None, split_v: int | None = None, num_warps: int | None = None
                  ) -> torch.Tensor:
    """``u = p1_scale · δ P1ᵀ`` ``[C, k1]`` fp32 from a δ chunk ``[C, V]`` (row stride free, unit column
    stride) with the ``tiled`` Triton kernel: BM-row tiles, V split into ``split_v`` slices whose fp32
    partials are summed in slice order."""
    if delta.dim() != 2 or delta.stride(1) != 1:
        raise ValueError(f"δ must be a 2-D row-major chunk, got shape {tuple(delta.shape)} strides {delta.stride()}")
    if p1t.dim() != 2 or p1t.shape[0] != delta.shape[1] or p1t.stride(1) != 1:
        raise ValueError(f"P1ᵀ must be a contiguous [V={delta.shape[1]}, k1] matrix, got {tuple(p1t.shape)}")
    _check_triton_dtype(delta)
    if split_v is not None and (not isinstance(split_v, int) or split_v < 1):
        raise ValueError(f"split_v must be a positive int or None, got {split_v!r}")
    C, V = delta.shape
    k1 = p1t.shape[1]
    interp = interpreting()
    cfg = launch_configs.proj_u(C, V, delta.dtype, k1, interpret=interp)
    BM, BV = block_m or cfg.block_m, block_v or cfg.block_v
    warps = cfg.num_warps if interp else (num_warps or cfg.num_warps)
    S = split_v or launch_configs.proj_u_splits(C, V, BM, BV, interpret=interp, device=delta.device)
    per_split = cdiv(cdiv(V, S), BV) * BV          # each slice a whole number of BV tiles
    S = cdiv(V, per_split)
    part = torch.empty(S, C, k1, device=delta.device, dtype=torch.float32)
    if C > 0:
        _proj_u_kernel[(cdiv(C, BM), S)](delta, delta.stride(0), p1t, p1t.stride(0), part, part.stride(0),
                                         part.stride(1), C, V, k1, per_split, BM=BM, BV=BV,
                                         BK1=next_pow2(k1, 16), DOT_IEEE=p1t.dtype == torch.float32,
                                         num_warps=warps,
                                         **({"num_stages": cfg.num_stages} if cfg.num_stages and not interp else {}))
    u = part[0] if S == 1 else part.sum(0)
    return u.mul_(p1_scale) if p1_scale != 1.0 else u


def scale_(t: torch.Tensor, s: torch.Tensor, backend: str = "torch", *, block_rows: int = 4096) -> torch.Tensor:
    """``t *= s`` in place, computed in fp32 whatever ``t``'s dtype (``s``: a scalar tensor on ``t``'s device, read
    there: no host sync). Multiplying a bf16 tensor by an fp32 tensor in torch would first round ``s`` to bf16
    (exact only for powers of two); here ``s`` stays fp32 and each element is rounded once. Triton: one pass
    (:func:`_scale_kernel`); torch: fp32 tensors directly, others ``block_rows`` rows at a time through an fp32
    copy of the block."""
    s = scale_tensor(s, t.device)
    if t.dtype == torch.float32 or t.numel() == 0:
        return t.mul_(s)
    if backend == "triton" and t.is_contiguous():
        _check_triton_dtype(t)
        n = t.numel()
        cfg = launch_configs.scale(t.dtype, interpret=interpreting())
        _scale_kernel[(cdiv(n, cfg.block_m),)](t, n, s, BLOCK=cfg.block_m, num_warps=cfg.num_warps)
        return t
    flat = t.view(t.shape[0], -1) if t.dim() > 1 else t.view(-1, 1)
    for r0 in range(0, flat.shape[0], block_rows):
        blk = flat[r0:r0 + block_rows]
        blk.copy_(blk.float().mul_(s))
    return t


def _delta_and_u_torch(logits: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                       hit: torch.Tensor, valid: torch.Tensor, scale: float, p1t: torch.Tensor | None,
                       p1_scale: float) -> torch.Tensor | None:
    """Turn ``z`` (fp32 view or copy of ``logits``) into δ = scale·valid·(exp(z - lse) - onehot) in place,
    the onehot at column ``target`` of rows where ``hit``; store δ in ``logits``; return u = δ P1ᵀ."""
    z.sub_(lse[:, None]).exp_()
    return _finish_delta(logits, z, target, hit, valid, scale, p1t, p1_scale)


def _finish_delta(logits, z, target, hit, valid, scale, p1t, p1_scale):
    """``z`` holds the softmax: subtract the onehot, scale, store δ in ``logits``; return u = δ P1ᵀ."""
    z.scatter_add_(1, target[:, None], -hit.to(z.dtype)[:, None])
    z.mul_((valid.to(z.dtype) * scale)[:, None])
    if z.data_ptr() != logits.data_ptr():
        logits.copy_(z)
    u = None
    if p1t is not None:
        u = z @ p1t.float()
        if p1_scale != 1.0:
            u.mul_(p1_scale)
    return u


_FP32_BLOCK_ELEMS = 1 << 22    # torch CE passes on bf16/fp16 logits: fp32 copies of at most 16 MB at a time


def _row_blocks(logits: torch.Tensor):
    """Row ranges a torch CE pass works through: the whole chunk when the logits are fp32 (the pass then works in
    place, with no temporary of the chunk's size), else blocks of at most an eighth of the chunk's rows and 16 MB,
    so the pass never holds an fp32 copy of the whole chunk."""
    C, V = logits.shape
    step = C if logits.dtype == torch.float32 else max(1, min(C // 8, _FP32_BLOCK_ELEMS // max(V, 1)))
    return [(r, min(C, r + step)) for r in range(0, C, step)] or [(0, 0)]


def ce_delta_torch(logits: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor, ignore_index: int,
                   p1t: torch.Tensor | None = None, p1_scale: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch CE pass with the same contract as :func:`ce_delta_triton`."""
    _check_ce_args(logits, labels, p1t)
    blocks = _row_blocks(logits)
    if len(blocks) > 1:
        parts = [_ce_delta_torch_block(logits[r0:r1], labels[r0:r1], scale, ignore_index, p1t, p1_scale)
                 for r0, r1 in blocks]
        return (torch.cat([p[0] for p in parts]),
                None if p1t is None else torch.cat([p[1] for p in parts]))
    return _ce_delta_torch_block(logits, labels, scale, ignore_index, p1t, p1_scale)


@torch.no_grad()
def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy ``[C]`` fp32 of ``logits [C, V]`` (no gradient; 0 where ``labels`` is ignored),
    computed in fp32 a block of rows at a time (:func:`_row_blocks`): bf16 logits never get a second, fp32 copy
    of their full size. For reading the training loss next to a model's own loss (the capture path)."""
    out = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    for r0, r1 in _row_blocks(logits):
        out[r0:r1] = F.cross_entropy(logits[r0:r1].float(), labels[r0:r1], ignore_index=ignore_index,
                                     reduction="none")
    return out


def _ce_delta_torch_block(logits, labels, scale, ignore_index, p1t, p1_scale):
    """The CE pass on a block of rows, in place: ``z`` is the logits themselves when they are fp32 (else an fp32
    copy of the block); the softmax is formed in ``z`` (``exp(z - max) / Σ``), with no temporary of its size."""
    z = logits.float()  # the same tensor when logits are fp32 (then δ is written in place directly)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    zy = z.gather(1, safe[:, None]).squeeze(1)
    m = z.amax(dim=1)
    z.sub_(m[:, None]).exp_()
    total = z.sum(dim=1)
    lse = m + torch.log(total)
    token_loss = torch.where(valid, lse - zy, torch.zeros_like(lse))
    z.div_(total[:, None])
    u = _finish_delta(logits, z, safe, valid, valid, scale, p1t, p1_scale)
    return token_loss, u


# --- vocab-parallel passes: A = shard statistics, B = δ from the global lse (same contracts per backend)
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


# ----------------------------------------------------------------------------------------------
# Chunked driver (shared by both backends and by the vocab-parallel variant)
# ----------------------------------------------------------------------------------------------
class VocabShard(NamedTuple):
    """Where a vocab-parallel call's weight sits: rows ``[start, start + V_r)`` of the full LM head, the
    TP process group, and whether ``dX`` is all-reduced over it (see
    :func:`vocab_parallel_fused_linear_cross_entropy`)."""

    start: int
    group: Any
    reduce_dx: bool


def _row_weights_of(row_weights, s: int, e: int, u, w, dev) -> torch.Tensor:
    """The fp32 weights ``[e - s]`` of rows ``[s, e)``: a slice of a tensor, or the function's answer."""
    if callable(row_weights):
        r = row_weights(s, e, None if u is None else u[s:e], None if w is None else w[s:e])
    else:
        r = row_weights[s:e]
    if not isinstance(r, torch.Tensor) or r.shape != (e - s,):
        raise ValueError(f"row_weights must give a tensor of shape [{e - s}] for rows [{s}, {e}), got "
                         f"{type(r).__name__} {tuple(getattr(r, 'shape', ()))}")
    return r.to(device=dev, dtype=torch.float32)


def _two_pass_forward(hidden, weight, labels, ignore_index, reduction, projection, chunk_tokens, backend,
                      need_dx, need_dw, shard, row_weights, u_method):
    """Row weights that need a group longer than a chunk: pass 1 (CE + projections, no dX/dW), the weights
    of all rows, then pass 2 recomputes every chunk's logits with the weights known (dX, dW)."""
    _, token_loss, u, w, _, _ = _chunked_forward(hidden, weight, labels, ignore_index, reduction, projection,
                                                 chunk_tokens, backend, False, False, shard, u_method=u_method)
    r = _row_weights_of(row_weights, 0, hidden.shape[0], u, w, hidden.device)
    loss, dX, dW = _weighted_loss(token_loss, r, labels, ignore_index, reduction), None, None
    if need_dx or need_dw:
        _, _, _, _, dX, dW = _chunked_forward(hidden, weight, labels, ignore_index, reduction, None, chunk_tokens,
                                              backend, need_dx, need_dw, shard, row_weights=r)
    return loss, token_loss, u, w, dX, dW


def _weighted_loss(token_loss, r, labels, ignore_index, reduction):
    total = (token_loss * r).sum()
    if reduction == "mean":
        return total / (labels != ignore_index).sum()     # on the device; 0/0 = NaN without a valid token
    return total


def _chunked_forward(hidden, weight, labels, ignore_index, reduction, projection, chunk_tokens, backend,
                     need_dx, need_dw, shard: VocabShard | None = None, row_weights=None, row_group: int = 1,
                     u_method: str = "fused"):
    """Returns (loss, token_loss, u, w, dX, dW) with dX/dW already scaled by the loss's own scaling.

    With ``shard``, ``weight`` is a vocab shard: the CE pass is :func:`ce_vocab_parallel`, P1ᵀ is sliced to
    the shard's rows, and after the last chunk ``u`` (and ``dX`` if ``shard.reduce_dx``) are all-reduced.
    With ``row_weights`` (a tensor [N] or a function, see the module docstring) every token's loss, dX row
    and dW contribution is weighted. ``u_method`` says where ``u = δ P1ᵀ`` comes from (see ``U_METHODS``);
    the logits GEMM, the CE pass that writes δ and the dW GEMM are the same for every method."""
    if callable(row_weights):
        if row_group > chunk_tokens:
            return _two_pass_forward(hidden, weight, labels, ignore_index, reduction, projection, chunk_tokens,
                                     backend, need_dx, need_dw, shard, row_weights, u_method)
        chunk_tokens = (chunk_tokens // row_group) * row_group   # chunks never split a group
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cdt = hidden.dtype           # the GEMMs' operand dtype (the caller cast hidden: autocast, see _run)
    # cuBLAS is several times slower when the logits row stride (V) is not 16-byte aligned (e.g.
    # V=50257): on CUDA, pad W with zero rows to a multiple of 16; padded logits are exactly 0, the CE
    # pass ignores them (it only touches columns < V), and their δ columns stay 0.
    V_pad = V
    if (hidden.is_cuda or _PAD_V_ON_CPU) and V % 16 != 0:
        V_pad = V + (16 - V % 16)
    valid = labels != ignore_index
    n_valid = valid.sum()        # stays on the device: no host sync
    if reduction == "mean":
        scale = torch.where(n_valid > 0, 1.0 / n_valid.clamp_min(1).to(torch.float32),
                            torch.zeros((), device=dev, dtype=torch.float32))
    else:
        scale = 1.0
    if shard is None:
        ce = ce_delta_triton if backend == "triton" else ce_delta_torch
    else:
        ce = functools.partial(ce_vocab_parallel, vocab_start=shard.start, group=shard.group, backend=backend)
    # "augmented" needs the dX GEMM; a call without dX (no grad, pass 1 of the two-pass path) uses "gemm".
    method = u_method if (projection is not None and (u_method != "augmented" or need_dx)) else "gemm"
    p1t = p2t = w_aug = None
    p1_scale = p2_scale = 1.0
    if projection is not None:
        low = cdt in (torch.bfloat16, torch.float16)
        if method == "augmented":
            op_dtype = cdt                                # a column block of the dX GEMM's operand
        elif method == "fused":
            op_dtype = cdt if (backend == "triton" and low) else torch.float32
        else:                                             # a GEMM on δ as stored (in the logits dtype)
            op_dtype = cdt if low else torch.float32
        p1t, p1_scale = projection.operand("P1", op_dtype, dev)
        if shard is not None:
            p1t = p1t[shard.start:shard.start + V]  # a contiguous block of rows of P1ᵀ
        p2t, p2_scale = projection.operand("P2", torch.float32, dev)
    # The GEMM operand W_c: W itself when it already is [V, d] in the compute dtype, else ONE copy that casts
    # and pads it at once (under autocast F.linear makes the same cast copy); "augmented" appends P1ᵀ's
    # columns to that same copy, W_aug = [W | P1ᵀ], so δ W_aug = [dX | u].
    if method == "augmented":
        w_aug = torch.zeros(V_pad, d + p1t.shape[1], device=dev, dtype=cdt)
        w_aug[:V, :d].copy_(weight)
        w_aug[:V, d:].copy_(p1t)
        w_c = w_aug[:, :d]
    elif weight.dtype != cdt or V_pad != V:
        w_c = torch.empty(V_pad, d, device=dev, dtype=cdt)
        w_c[:V].copy_(weight)
        w_c[V:].zero_()
    else:
        w_c = weight
    token_loss = torch.empty(N, device=dev, dtype=torch.float32)
    u = torch.empty(N, projection.k1, device=dev, dtype=torch.float32) if projection is not None else None
    w = torch.empty(N, projection.k2, device=dev, dtype=torch.float32) if projection is not None else None
    dX = torch.empty_like(hidden) if need_dx else None
    dW = torch.zeros_like(weight) if need_dw else None        # the weight's dtype: fp32 master weights, fp32 dW
    r_all = torch.empty(N, device=dev, dtype=torch.float32) if row_weights is not None else None
    for s in range(0, N, chunk_tokens):
        e = min(N, s + chunk_tokens)
        x = hidden[s:e]
        logits_full = torch.mm(x, w_c.t())
        logits = logits_full[:, :V] if V_pad != V else logits_full
        tl_c, u_c = ce(logits, labels[s:e], scale, ignore_index, p1t if method == "fused" else None, p1_scale)
        token_loss[s:e] = tl_c
        if need_dx:
            if w_aug is not None:       # one GEMM gives [dX | u]
                dx_u = torch.mm(logits_full, w_aug)
                dX[s:e] = dx_u[:, :d]
                u_c = dx_u[:, d:].float()
                del dx_u
            else:
                torch.mm(logits_full, w_c, out=dX[s:e])
        if projection is not None:
            if method in ("gemm", "tiled"):   # one more pass over the δ chunk
                u_c = proj_u_triton(logits, p1t) if method == "tiled" else mm_fp32(logits, p1t)
            if method != "fused" and p1_scale != 1.0:   # the CE pass scales its own u
                u_c.mul_(p1_scale)
            u[s:e] = u_c
            torch.mm(x.float(), p2t, out=w[s:e])
            if p2_scale != 1.0:
                w[s:e].mul_(p2_scale)
        if r_all is not None:  # weighted rows: dX_t = r_t Wᵀδ_t, dW += δᵀ (r x)
            r_all[s:e] = _row_weights_of(row_weights, s, e, u, w, dev)
            x = x * r_all[s:e, None].to(x.dtype)
            if need_dx:
                dX[s:e].mul_(r_all[s:e, None].to(dX.dtype))
        if need_dw:
            accumulate_mm_(dW, logits.t(), x, block_rows=chunk_tokens)
        del logits_full, logits  # free this chunk before the next one is allocated (peak = one chunk)
    del w_aug, w_c
    if shard is not None:  # one collective each for the whole call, not one per chunk
        if u is not None:
            all_reduce_(u, "sum", shard.group)
        if dX is not None and shard.reduce_dx:
            all_reduce_(dX, "sum", shard.group)
    if r_all is not None:
        loss = _weighted_loss(token_loss, r_all, labels, ignore_index, reduction)
    elif reduction == "mean":
        loss = token_loss.sum() / n_valid     # 0/0 = NaN for a call with no valid token
    else:
        loss = token_loss.sum()
    return loss, token_loss, u, w, dX, dW


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------
class _FusedLinearCEFunction(torch.autograd.Function):
    """Gradient-in-forward: dX and dW are computed chunk by chunk in forward and scaled by
    ``grad_output`` in backward (no communication in backward, also for a vocab shard)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, projection, chunk_tokens, backend, shard,
                row_weights, row_group, u_method):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, token_loss, u, w, dX, dW = _chunked_forward(hidden, weight, labels, ignore_index, reduction,
                                                          projection, chunk_tokens, backend, need_dx, need_dw,
                                                          shard, row_weights, row_group, u_method)
        ctx.save_for_backward(dX, dW)
        ctx.backend, ctx.chunk_tokens = backend, chunk_tokens
        empty = hidden.new_empty(0, dtype=torch.float32)
        u = empty if u is None else u
        w = empty if w is None else w
        ctx.mark_non_differentiable(token_loss, u, w)
        return loss, token_loss, u, w

    @staticmethod
    def backward(ctx, grad_loss, _g_tok, _g_u, _g_w):
        # dX and dW were formed in forward; scale them by the loss's gradient in place, in fp32, on the device
        # (no host read of grad_loss, no second [V, d] buffer). A second backward through the same forward
        # fails on the saved tensors' version counter instead of scaling twice.
        dX, dW = ctx.saved_tensors
        g = grad_loss.detach().to(torch.float32)
        if dX is not None:
            scale_(dX, g, ctx.backend, block_rows=ctx.chunk_tokens)
        if dW is not None:
            scale_(dW, g, ctx.backend, block_rows=ctx.chunk_tokens)
        return dX, dW, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _flatten_checked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str,
                     chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the common arguments; return (hidden [N, d] contiguous, labels [N] int64 contiguous)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"expected hidden [..., d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    d = hidden.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"hidden size mismatch: hidden has d={d}, weight is {tuple(weight.shape)}")
    hidden2 = hidden.reshape(-1, d)
    labels1 = labels.reshape(-1)
    if labels1.shape[0] != hidden2.shape[0]:
        raise ValueError(f"labels has {labels1.shape[0]} entries but hidden has {hidden2.shape[0]} tokens")
    if labels1.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels1.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"hidden, weight and labels must share a device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return hidden2.contiguous(), labels1.long().contiguous()


def _check_u_method(u_method: str, backend: str) -> None:
    if u_method not in U_METHODS:
        raise ValueError(f"u_method must be one of {U_METHODS}, got {u_method!r}")
    if u_method == "tiled" and backend != "triton":
        raise ValueError("u_method='tiled' is a Triton kernel but the backend is 'torch' (no CUDA device, or "
                         "backend='torch'); use u_method='gemm' there")


def head_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMMs run in: under autocast on ``hidden``'s device the autocast dtype, as
    ``F.linear`` would (bf16 operands with fp32 accumulation, whatever the weight's dtype); otherwise the hidden
    states' own dtype (the weight is cast to it)."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def head_input(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The hidden states as megamix's LM-head losses (``Mixer.lm_head_loss``, the Megatron loss) hand them to
    the kernel: under autocast unchanged (the kernel casts them to the autocast dtype, :func:`head_dtype`),
    otherwise in the weight's dtype, so a bf16 engine runs a bf16 head and fp32 weights an fp32 head."""
    if torch.is_autocast_enabled(hidden.device.type) or hidden.dtype == weight.dtype:
        return hidden
    return hidden.to(weight.dtype)


def _run(hidden2, weight, labels1, ignore_index, reduction, projection, chunk_tokens, backend,
         shard: VocabShard | None, row_weights=None, row_group: int = 1, u_method: str = "fused") -> LinearCEOutput:
    """Through the autograd.Function when a gradient is needed, else the driver alone. The hidden states are
    cast to :func:`head_dtype` here, outside the Function, so autograd returns their gradient in their own
    dtype; the weight enters in its own dtype and its gradient comes back in it (fp32 for fp32 master
    weights)."""
    cdt = head_dtype(hidden2)
    if hidden2.dtype != cdt:
        hidden2 = hidden2.to(cdt)
    with torch.autocast(device_type=hidden2.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden2.requires_grad or weight.requires_grad):
            loss, token_loss, u, w = _FusedLinearCEFunction.apply(hidden2, weight, labels1, ignore_index,
                                                                  reduction, projection, chunk_tokens, backend,
                                                                  shard, row_weights, row_group, u_method)
            if projection is None:
                u = w = None
        else:
            loss, token_loss, u, w, _, _ = _chunked_forward(hidden2, weight, labels1, ignore_index, reduction,
                                                            projection, chunk_tokens, backend, False, False, shard,
                                                            row_weights, row_group, u_method)
    return LinearCEOutput(loss, token_loss, u, w)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               projection: Projection | None = None, chunk_tokens: int = 4096,
                               backend: str = "auto", row_weights=None, row_group: int = 1,
                               u_method: str = "fused") -> LinearCEOutput:
    """Cross-entropy of ``hidden @ weightᵀ`` against ``labels`` without materialising all logits.

    Args:
        hidden: ``[N, d]`` (leading dims are flattened) final hidden states ``a_t``.
        weight: ``[V, d]`` LM-head weight.
        labels: ``[N]`` integer targets; ``ignore_index`` entries contribute nothing.
        reduction: ``"mean"`` (over non-ignored tokens; NaN if there are none) or ``"sum"``.
        projection: a :class:`~megamix.kernels.projection.Projection` with ``P1 [k1,V]``, ``P2 [k2,d]`` to also
            emit ``u = P1 δ`` and ``w = P2 a``; None disables it.
        chunk_tokens: tokens per chunk (peak extra memory ≈ chunk_tokens × V logits).
        backend: ``"auto"`` (triton on CUDA, else torch), ``"torch"`` or ``"triton"``.
        row_weights: None (default: the plain loss), a tensor ``[N]`` of per-token loss weights, or a
            function ``f(start, end, u_rows, w_rows) -> [end - start]`` giving the weights of rows
            ``[start, end)`` from their projections (``u_rows``/``w_rows`` are None without a projection).
            The loss is then ``Σ_t r_t ℓ_t`` (÷ valid tokens for ``mean``) and its gradient is weighted
            alike; ``u``, ``w`` and ``token_loss`` stay unweighted. See the module docstring.
        row_group: with a function ``row_weights``: rows come in groups of this many consecutive rows
            (e.g. the tokens of one sample, ``N`` a multiple of it) that a call never splits.
        u_method: where ``u = δ P1ᵀ`` is computed, one of :data:`U_METHODS` (``fused`` default; ``tiled``
            needs the Triton backend). δ, the loss and dW are bit-identical for every method and with the
            projection off; so is dX except under ``augmented``, whose wider dX GEMM may round differently.

    Returns:
        :class:`LinearCEOutput`; ``loss`` is differentiable w.r.t. ``hidden`` and ``weight``.
    """
    hidden2, labels1 = _flatten_checked(hidden, weight, labels, reduction, chunk_tokens)
    if projection is not None and (projection.V != weight.shape[0] or projection.d != hidden2.shape[1]):
        raise ValueError(f"projection is for V={projection.V}, d={projection.d} but the LM head is "
                         f"V={weight.shape[0]}, d={hidden2.shape[1]}")
    if row_weights is not None:
        N = hidden2.shape[0]
        if not (isinstance(row_group, int) and row_group >= 1):
            raise ValueError(f"row_group must be a positive int, got {row_group!r}")
        if callable(row_weights):
            if N % row_group:
                raise ValueError(f"{N} rows are not a whole number of groups of row_group={row_group}")
        elif not isinstance(row_weights, torch.Tensor) or row_weights.reshape(-1).shape != (N,):
            raise ValueError(f"row_weights must be None, a function or a tensor with one weight per row ({N}), "
                             f"got {type(row_weights).__name__} {tuple(getattr(row_weights, 'shape', ()))}")
        else:
            row_weights = row_weights.reshape(-1).detach()
    be = resolve_backend(backend, hidden.device)
    _check_u_method(u_method, be)
    return _run(hidden2, weight, labels1, ignore_index, reduction, projection, chunk_tokens, be, None,
                row_weights, row_group, u_method)


def vocab_parallel_fused_linear_cross_entropy(hidden: torch.Tensor, weight_shard: torch.Tensor,
                                              labels: torch.Tensor, *, vocab_start: int, group: Any = None,
                                              ignore_index: int = -100, reduction: str = "mean",
                                              projection: Projection | None = None, chunk_tokens: int = 4096,
                                              backend: str = "auto", reduce_dx: bool = True,
                                              u_method: str = "fused") -> LinearCEOutput:
    """:func:`fused_linear_cross_entropy` for a vocab-parallel (tensor-parallel) LM head.

    Every rank of the TP ``group`` calls it together with the same ``hidden`` and ``labels`` and its own
    vocab shard ``weight_shard = W[vocab_start : vocab_start + V_r]`` (Megatron's ``output_layer``
    weight; padded vocabulary rows are ordinary rows). The result equals the unsharded call with the full
    ``W``: ``loss``, ``token_loss``, ``u`` and ``w`` are identical on every rank; the gradient w.r.t.
    ``weight_shard`` is the shard's rows of the full ``dW``.

    Args:
        hidden: ``[N, d]`` (leading dims are flattened), replicated across the TP group.
        weight_shard: ``[V_r, d]`` this rank's rows of the LM head.
        labels: ``[N]`` full-vocabulary targets (``ignore_index`` = skip).
        vocab_start: index of ``weight_shard``'s first row in the full vocabulary.
        group: the tensor-parallel ``torch.distributed`` process group (None = the default group).
        projection: the *full-vocabulary* projection (``P1 [k1, V]`` with ``V`` ≥ ``vocab_start + V_r``,
            the same on every rank); each rank uses P1's columns of its shard and ``u`` is all-reduced.
        reduce_dx: True (default): the gradient w.r.t. ``hidden`` is the full ``Σ_r δ_r W_r``, all-reduced
            here, as needed when ``hidden`` is an ordinary replicated tensor (the fused loss replaces
            Megatron's ``output_layer`` and the ``copy_to_tensor_model_parallel_region`` inside it).
            False: it is this rank's partial ``δ_r W_r``, for a caller whose own autograd op sums it
            (Megatron's ``copy_to_tensor_model_parallel_region`` or, with sequence parallelism, the
            reduce-scatter in the backward of ``gather_from_sequence_parallel_region``).
        ignore_index, reduction, chunk_tokens, backend, u_method: as in :func:`fused_linear_cross_entropy`.

    With a group of one rank (or torch.distributed not initialised) this *is*
    :func:`fused_linear_cross_entropy` (``vocab_start`` must then be 0). Communication per chunk: one
    MAX all-reduce of ``[C]`` and one SUM all-reduce of ``[2, C]`` fp32; per call: one SUM of ``u [N, k1]``
    and, with ``reduce_dx``, one of ``dX [N, d]``; nothing in backward.
    """
    if not isinstance(vocab_start, numbers.Integral) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int (the shard's first vocab row), got {vocab_start!r}")
    vocab_start = int(vocab_start)
    if group_size(group) == 1:
        if vocab_start != 0:
            raise ValueError(f"vocab_start={vocab_start} but the TP group has one rank, so the weight must be the "
                             "whole vocabulary (vocab_start=0); pass the tensor-parallel group as group=")
        return fused_linear_cross_entropy(hidden, weight_shard, labels, ignore_index=ignore_index,
                                          reduction=reduction, projection=projection, chunk_tokens=chunk_tokens,
                                          backend=backend, u_method=u_method)
    hidden2, labels1 = _flatten_checked(hidden, weight_shard, labels, reduction, chunk_tokens)
    V_r = weight_shard.shape[0]
    if projection is not None and (projection.V < vocab_start + V_r or projection.d != hidden2.shape[1]):
        raise ValueError(f"projection is for V={projection.V}, d={projection.d} but this shard covers vocab rows "
                         f"[{vocab_start}, {vocab_start + V_r}) with d={hidden2.shape[1]}: build the projection "
                         "for the full (padded) vocabulary")
    be = resolve_backend(backend, hidden.device)
    _check_u_method(u_method, be)
    return _run(hidden2, weight_shard, labels1, ignore_index, reduction, projection, chunk_tokens, be,
                VocabShard(vocab_start, group, bool(reduce_dx)), u_method=u_method)


__all__ = ["LinearCEOutput", "VocabShard", "U_METHODS", "proj_u_triton", "head_dtype", "head_input", "scale_", "token_cross_entropy", "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
           "vocab_parallel_fused_linear_cross_entropy", "vocab_parallel_cross_entropy_ref",
           "ce_delta_triton", "ce_delta_torch", "ce_shard_stats_triton", "ce_shard_stats_torch",
           "ce_shard_delta_triton", "ce_shard_delta_torch", "ce_vocab_parallel"]

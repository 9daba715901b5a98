"""Chunked fused linear cross-entropy that also emits factored gradient projections.

For hidden states ``a_t`` (rows of ``hidden [N,d]``), LM head ``W [V,d]`` and labels ``y_t``::

    z_t = W a_t,   δ_t = s_t (softmax(z_t) - onehot(y_t)),   s_t = scale (1/n_valid or 1), 0 if ignored
    loss = Σ_t s_t (lse(z_t) - z_t[y_t]),  dX_t = Wᵀ δ_t,  dW = Σ_t δ_t a_tᵀ
    u_t = P1 δ_t  [k1],   w_t = P2 a_t  [k2]

so that the projected per-sample gradient is ``g_i = Σ_{t∈i} u_t w_tᵀ = P1 G_i P2ᵀ``.

The forward walks the tokens in chunks of ``chunk_tokens``: logits chunk = ``x @ Wᵀ`` (torch.mm),
then one CE pass turns the logits into δ *in place* (online log-sum-exp, loss, and — when a
projection is given — ``u = δ P1ᵀ`` accumulated with ``tl.dot`` over V tiles inside the same pass),
then ``dX = δ W`` and ``dW += δᵀ x`` (torch.mm / addmm). Gradients are computed in the forward and
rescaled by ``grad_output`` in the backward, so the full ``N×V`` logits never exist and nothing but
``dX``/``dW`` is saved. The projection only *reads* δ, so training gradients are bit-identical with
the projection on or off.

Layout of this file: reference → Triton kernel → launchers → chunked driver → autograd.Function →
public :func:`fused_linear_cross_entropy`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.projection import Projection
from kernels.utils import HAS_TRITON, cdiv, interpreting, next_pow2, resolve_backend, tl, triton

REDUCTIONS = ("mean", "sum")
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
                                   projection: Projection | None = None) -> LinearCEOutput:
    """Exact reference in fp32: full logits + ``F.cross_entropy`` + explicit δ and materialised
    projection. Differentiable through autograd."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    logits = hidden.float() @ weight.float().t()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
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


# ----------------------------------------------------------------------------------------------
# Triton kernel: CE pass over a logits chunk, δ written in place, u = δ P1ᵀ fused
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _ce_delta_proj_kernel(logits_ptr, stride_l, labels_ptr, loss_ptr, p1t_ptr, stride_p, u_ptr, stride_u,
                              C, V, K1, scale, p1_scale, ignore_index,
                              HAS_PROJ: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
                              BK1: tl.constexpr, DOT_IEEE: tl.constexpr):
        """One program owns BM rows of the chunk and sweeps all of V twice (no atomics).

        Pass 1: online max / sum-exp -> lse; the target logit is read directly.
        Pass 2: δ = s (exp(z - lse) - onehot) stored over z; if HAS_PROJ, u += δ_tile @ P1ᵀ_tile."""
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < C
        rows64 = rows.to(tl.int64)
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
        valid = rmask & (y != ignore_index)
        row_scale = tl.where(valid, scale, 0.0)
        row_base = logits_ptr + rows64 * stride_l

        zy = tl.load(row_base + y, mask=valid, other=0.0).to(tl.float32)
        m = tl.full([BM], -1e30, tl.float32)
        s = tl.zeros([BM], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            msk = rmask[:, None] & (cols < V)[None, :]
            z = tl.load(row_base[:, None] + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        lse = tl.where(rmask, m + tl.log(tl.maximum(s, 1e-30)), 0.0)
        tl.store(loss_ptr + rows, tl.where(valid, lse - zy, 0.0), mask=rmask)

        kcols = tl.arange(0, BK1)
        u_acc = tl.zeros([BM, BK1], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < V
            msk = rmask[:, None] & cmask[None, :]
            z = tl.load(row_base[:, None] + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
            p = tl.exp(z - lse[:, None])
            dlt = tl.where(cols[None, :] == y[:, None], p - 1.0, p) * row_scale[:, None]
            dlt = tl.where(msk, dlt, 0.0)
            tl.store(row_base[:, None] + cols[None, :], dlt.to(logits_ptr.dtype.element_ty), mask=msk)
            if HAS_PROJ:
                pt = tl.load(p1t_ptr + cols[:, None].to(tl.int64) * stride_p + kcols[None, :],
                             mask=cmask[:, None] & (kcols < K1)[None, :], other=0.0)
                if DOT_IEEE:
                    u_acc = tl.dot(dlt.to(pt.dtype), pt, u_acc, input_precision="ieee")
                else:
                    u_acc = tl.dot(dlt.to(pt.dtype), pt, u_acc)
        if HAS_PROJ:
            tl.store(u_ptr + rows64[:, None] * stride_u + kcols[None, :], u_acc * p1_scale,
                     mask=rmask[:, None] & (kcols < K1)[None, :])


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


def ce_delta_triton(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                    p1t: torch.Tensor | None = None, p1_scale: float = 1.0, *,
                    block_m: int | None = None, block_v: int | None = None, num_warps: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton CE pass: overwrite ``logits [C,V]`` with δ; return (token_loss [C] fp32, u [C,k1] fp32 | None)."""
    _check_ce_args(logits, labels, p1t)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits dtype {logits.dtype} not supported (fp32, fp16, bf16)")
    C, V = logits.shape
    k1 = p1t.shape[1] if p1t is not None else 1
    BK1 = next_pow2(k1, 16)
    if interpreting():
        BM = block_m or min(64, next_pow2(C, 16))
        BV = block_v or 64
        warps = 4
    else:
        # One tile config whether or not the projection is on: the online-softmax order (hence δ and
        # the training gradients) must not depend on it. Chosen from an H200 sweep of this pass
        # (kernels/bench/results/gpu_h200: 16x256/8 warps is the fastest without projection, 1.69 ms per
        # 8192x128256 bf16 chunk, and within 6% of the fastest with k1=64, 2.74 ms).
        BM = block_m or 16
        BV = block_v or 256
        warps = num_warps or 8
    stages = {"num_stages": 2} if (BK1 >= 128 and not interpreting()) else {}
    loss = torch.empty(C, device=logits.device, dtype=torch.float32)
    u = torch.empty(C, k1, device=logits.device, dtype=torch.float32) if p1t is not None else loss
    if C > 0:
        _ce_delta_proj_kernel[(cdiv(C, BM),)](
            logits, logits.stride(0), labels, loss,
            p1t if p1t is not None else logits, p1t.stride(0) if p1t is not None else 0,
            u, u.stride(0), C, V, k1, float(scale), float(p1_scale), int(ignore_index),
            HAS_PROJ=p1t is not None, BM=BM, BV=BV, BK1=BK1,
            DOT_IEEE=(p1t is None or p1t.dtype == torch.float32), num_warps=warps, **stages)
    return loss, (u if p1t is not None else None)


def ce_delta_torch(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
                   p1t: torch.Tensor | None = None, p1_scale: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch CE pass with the same contract as :func:`ce_delta_triton`."""
    _check_ce_args(logits, labels, p1t)
    z = logits.float()  # the same tensor when logits are fp32 (then δ is written in place directly)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=1)
    zy = z.gather(1, safe[:, None]).squeeze(1)
    token_loss = torch.where(valid, lse - zy, torch.zeros_like(lse))
    z.sub_(lse[:, None]).exp_()
    z.scatter_add_(1, safe[:, None], -valid.to(z.dtype)[:, None])
    z.mul_((valid.to(z.dtype) * scale)[:, None])
    if z.data_ptr() != logits.data_ptr():
        logits.copy_(z)
    u = None
    if p1t is not None:
        u = z @ p1t.float()
        if p1_scale != 1.0:
            u.mul_(p1_scale)
    return token_loss, u


# ----------------------------------------------------------------------------------------------
# Chunked driver (shared by both backends)
# ----------------------------------------------------------------------------------------------
def _chunked_forward(hidden, weight, labels, ignore_index, reduction, projection, chunk_tokens, backend,
                     need_dx, need_dw):
    """Returns (loss, token_loss, u, w, dX, dW) with dX/dW already scaled by the loss's own scaling."""
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    w_c = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    # cuBLAS is several times slower when the logits row stride (V) is not 16-byte aligned (e.g.
    # V=50257): on CUDA, pad W with zero rows to a multiple of 16; padded logits are exactly 0, the CE
    # pass ignores them (it only touches columns < V), and their δ columns stay 0.
    V_pad = V
    if (hidden.is_cuda or _PAD_V_ON_CPU) and V % 16 != 0:
        V_pad = V + (16 - V % 16)
        w_c = torch.cat([w_c, w_c.new_zeros(V_pad - V, d)])
    valid = labels != ignore_index
    n_valid = int(valid.sum())
    if reduction == "mean":
        scale = 1.0 / n_valid if n_valid > 0 else 0.0
    else:
        scale = 1.0
    ce = ce_delta_triton if backend == "triton" else ce_delta_torch
    p1t = p2t = None
    p1_scale = p2_scale = 1.0
    if projection is not None:
        op_dtype = hidden.dtype if (backend == "triton" and hidden.dtype != torch.float32) else torch.float32
        p1t, p1_scale = projection.operand("P1", op_dtype, dev)
        p2t, p2_scale = projection.operand("P2", torch.float32, dev)
    token_loss = torch.empty(N, device=dev, dtype=torch.float32)
    u = torch.empty(N, projection.k1, device=dev, dtype=torch.float32) if projection is not None else None
    w = torch.empty(N, projection.k2, device=dev, dtype=torch.float32) if projection is not None else None
    dX = torch.empty_like(hidden) if need_dx else None
    dW = weight.new_zeros(V_pad, d) if need_dw else None
    for s in range(0, N, chunk_tokens):
        e = min(N, s + chunk_tokens)
        x = hidden[s:e]
        logits_full = torch.mm(x, w_c.t())
        logits = logits_full[:, :V] if V_pad != V else logits_full
        tl_c, u_c = ce(logits, labels[s:e], scale, ignore_index, p1t, p1_scale)
        token_loss[s:e] = tl_c
        if projection is not None:
            u[s:e] = u_c
            torch.mm(x.float(), p2t, out=w[s:e])
            if p2_scale != 1.0:
                w[s:e].mul_(p2_scale)
        if need_dx:
            torch.mm(logits_full, w_c, out=dX[s:e])
        if need_dw:
            if dW.dtype == logits_full.dtype:
                dW.addmm_(logits_full.t(), x)
            else:
                dW.add_(torch.mm(logits_full.t(), x))
        del logits_full, logits  # free this chunk before the next one is allocated (peak = one chunk)
    if dW is not None and V_pad != V:
        dW = dW[:V].contiguous()
    if reduction == "mean":
        loss = token_loss.sum() / n_valid if n_valid > 0 else token_loss.sum() * float("nan")
    else:
        loss = token_loss.sum()
    return loss, token_loss, u, w, dX, dW


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------
class _FusedLinearCEFunction(torch.autograd.Function):
    """Gradient-in-forward: dX and dW are computed chunk by chunk in forward and scaled by
    ``grad_output`` in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, projection, chunk_tokens, backend):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, token_loss, u, w, dX, dW = _chunked_forward(hidden, weight, labels, ignore_index, reduction,
                                                          projection, chunk_tokens, backend, need_dx, need_dw)
        ctx.save_for_backward(dX, dW)
        empty = hidden.new_empty(0, dtype=torch.float32)
        u = empty if u is None else u
        w = empty if w is None else w
        ctx.mark_non_differentiable(token_loss, u, w)
        return loss, token_loss, u, w

    @staticmethod
    def backward(ctx, grad_loss, _g_tok, _g_u, _g_w):
        dX, dW = ctx.saved_tensors
        unit = bool(torch.equal(grad_loss, torch.ones_like(grad_loss)))
        gx = gw = None
        if dX is not None:
            gx = dX if unit else dX * grad_loss.to(dX.dtype)
        if dW is not None:
            gw = dW if unit else dW * grad_loss.to(dW.dtype)
        return gx, gw, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               projection: Projection | None = None, chunk_tokens: int = 4096,
                               backend: str = "auto") -> LinearCEOutput:
    """Cross-entropy of ``hidden @ weightᵀ`` against ``labels`` without materialising all logits.

    Args:
        hidden: ``[N, d]`` (leading dims are flattened) final hidden states ``a_t``.
        weight: ``[V, d]`` LM-head weight.
        labels: ``[N]`` integer targets; ``ignore_index`` entries contribute nothing.
        reduction: ``"mean"`` (over non-ignored tokens; NaN if there are none) or ``"sum"``.
        projection: a :class:`~kernels.projection.Projection` with ``P1 [k1,V]``, ``P2 [k2,d]`` to also
            emit ``u = P1 δ`` and ``w = P2 a``; None disables it.
        chunk_tokens: tokens per chunk (peak extra memory ≈ chunk_tokens × V logits).
        backend: ``"auto"`` (triton on CUDA, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        :class:`LinearCEOutput`; ``loss`` is differentiable w.r.t. ``hidden`` and ``weight``.
    """
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
    if projection is not None and (projection.V != weight.shape[0] or projection.d != d):
        raise ValueError(f"projection is for V={projection.V}, d={projection.d} but the LM head is "
                         f"V={weight.shape[0]}, d={d}")
    be = resolve_backend(backend, hidden.device)
    labels1 = labels1.long().contiguous()
    hidden2 = hidden2.contiguous()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden2.requires_grad or weight.requires_grad):
            loss, token_loss, u, w = _FusedLinearCEFunction.apply(hidden2, weight, labels1, ignore_index,
                                                                  reduction, projection, chunk_tokens, be)
            if projection is None:
                u = w = None
        else:
            loss, token_loss, u, w, _, _ = _chunked_forward(hidden2, weight, labels1, ignore_index, reduction,
                                                            projection, chunk_tokens, be, False, False)
    return LinearCEOutput(loss, token_loss, u, w)


__all__ = ["LinearCEOutput", "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
           "ce_delta_triton", "ce_delta_torch"]

"""One chunk of the fused linear cross-entropy (:mod:`megamix.kernels.fused_linear_ce`), and the operands every
chunk of a call shares.

A chunk of rows ``[s, e)`` of ``hidden`` runs: the logits GEMM ``x W_cᵀ`` (W padded to a multiple of 16 rows on
CUDA, cast once to the compute dtype), the CE pass that turns the logits into δ in place
(:mod:`~megamix.kernels.ce_pass`, or :mod:`~megamix.kernels.vocab_parallel` on a vocab shard), the dX GEMM
``δ W_c``, ``u = δ P1ᵀ`` where ``u_method`` puts it (:mod:`~megamix.kernels.proj_u`), ``w = x P2ᵀ``, the row weights,
and the dW GEMM ``dW += δᵀ x``. The driver (:func:`~megamix.kernels.fused_linear_ce._chunked_forward`) walks the
chunks and finishes the call (collectives, loss).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from megamix.kernels.ce_pass import ce_delta_torch, ce_delta_triton
from megamix.kernels.projection import accumulate_mm_
from megamix.kernels.proj_u import proj_u_torch, proj_u_triton, u_operand_dtype
from megamix.kernels.vocab_parallel import ce_vocab_parallel

_PAD_V_ON_CPU = False  # tests flip this to exercise the CUDA-only V padding on CPU


class _Head(NamedTuple):
    """The operands every chunk of one call shares (:func:`_head_operands`)."""

    ce: Any                       # the CE pass: ce_delta_triton / ce_delta_torch, or ce_vocab_parallel on a shard
    method: str                   # where u comes from (u_method; "augmented" without a dX GEMM computes like "gemm")
    V: int                        # rows of the weight (of the shard, for a vocab shard)
    V_pad: int                    # V padded to a multiple of 16 on CUDA: the logits' row stride
    w_c: torch.Tensor             # the logits and dX GEMMs' operand [V_pad, d] in the compute dtype
    w_aug: torch.Tensor | None    # "augmented": [W | P1ᵀ] [V_pad, d + k1]; w_c is a view of its first d columns
    p1t: torch.Tensor | None      # P1ᵀ [V, k1] (the shard's rows) in the dtype u is computed with
    p1_scale: float
    p2t: torch.Tensor | None      # P2ᵀ [d, k2] fp32
    p2_scale: float


class _Outputs(NamedTuple):
    """What one call returns, filled chunk by chunk (:func:`_chunk`); None where not asked for."""

    token_loss: torch.Tensor      # [N] fp32
    u: torch.Tensor | None        # [N, k1] fp32
    w: torch.Tensor | None        # [N, k2] fp32
    dX: torch.Tensor | None       # [N, d] in the hidden states' dtype
    dW: torch.Tensor | None       # [V, d] in the weight's dtype: fp32 master weights, fp32 dW
    r_all: torch.Tensor | None    # [N] fp32 row weights


def _projection_operands(projection, method, backend, cdt, dev, shard, V):
    """(P1ᵀ, p1_scale, P2ᵀ, p2_scale): P1ᵀ in the dtype ``method`` computes u with
    (:func:`~megamix.kernels.proj_u.u_operand_dtype`), cut to the shard's rows for a vocab shard; P2ᵀ in fp32.
    Without a projection (None, 1.0, None, 1.0)."""
    if projection is None:
        return None, 1.0, None, 1.0
    p1t, p1_scale = projection.operand("P1", u_operand_dtype(method, backend, cdt), dev)
    if shard is not None:
        p1t = p1t[shard.start:shard.start + V]  # a contiguous block of rows of P1ᵀ
    p2t, p2_scale = projection.operand("P2", torch.float32, dev)
    return p1t, p1_scale, p2t, p2_scale


def _gemm_operand(weight, p1t, method, V_pad, cdt, dev):
    """(W_c, W_aug). The GEMM operand W_c: W itself when it already is [V, d] in the compute dtype, else ONE copy
    that casts and pads it at once (under autocast F.linear makes the same cast copy); "augmented" appends P1ᵀ's
    columns to that same copy, W_aug = [W | P1ᵀ], so δ W_aug = [dX | u]."""
    V, d = weight.shape
    if method == "augmented":
        w_aug = torch.zeros(V_pad, d + p1t.shape[1], device=dev, dtype=cdt)
        w_aug[:V, :d].copy_(weight)
        w_aug[:V, d:].copy_(p1t)
        return w_aug[:, :d], w_aug
    if weight.dtype != cdt or V_pad != V:
        w_c = torch.empty(V_pad, d, device=dev, dtype=cdt)
        w_c[:V].copy_(weight)
        w_c[V:].zero_()
        return w_c, None
    return weight, None


def _head_operands(hidden, weight, projection, backend, need_dx, shard, u_method) -> _Head:
    """The CE pass, u's method, and the GEMM and projection operands of one call."""
    V = weight.shape[0]
    cdt = hidden.dtype           # the GEMMs' operand dtype (the caller cast hidden: autocast, see _run)
    # cuBLAS is several times slower when the logits row stride (V) is not 16-byte aligned (e.g.
    # V=50257): on CUDA, pad W with zero rows to a multiple of 16; padded logits are exactly 0, the CE
    # pass ignores them (it only touches columns < V), and their δ columns stay 0.
    V_pad = V
    if (hidden.is_cuda or _PAD_V_ON_CPU) and V % 16 != 0:
        V_pad = V + (16 - V % 16)
    if shard is None:
        ce = ce_delta_triton if backend == "triton" else ce_delta_torch
    else:
        ce = functools.partial(ce_vocab_parallel, vocab_start=shard.start, group=shard.group, backend=backend)
    # "augmented" needs the dX GEMM; a call without dX (no grad, pass 1 of the two-pass row-weight path) uses "gemm".
    method = u_method if (projection is not None and (u_method != "augmented" or need_dx)) else "gemm"
    p1t, p1_scale, p2t, p2_scale = _projection_operands(projection, method, backend, cdt, hidden.device, shard, V)
    w_c, w_aug = _gemm_operand(weight, p1t, method, V_pad, cdt, hidden.device)
    return _Head(ce, method, V, V_pad, w_c, w_aug, p1t, p1_scale, p2t, p2_scale)


def _allocate(hidden, weight, projection, need_dx, need_dw, weighted) -> _Outputs:
    """The outputs of one call, allocated once (u and w with a projection, dX / dW when asked for, r with row
    weights); dW starts at zero, it is accumulated over the chunks."""
    N, dev = hidden.shape[0], hidden.device
    token_loss = torch.empty(N, device=dev, dtype=torch.float32)
    u = torch.empty(N, projection.k1, device=dev, dtype=torch.float32) if projection is not None else None
    w = torch.empty(N, projection.k2, device=dev, dtype=torch.float32) if projection is not None else None
    dX = torch.empty_like(hidden) if need_dx else None
    dW = torch.zeros_like(weight) if need_dw else None        # the weight's dtype: fp32 master weights, fp32 dW
    r_all = torch.empty(N, device=dev, dtype=torch.float32) if weighted else None
    return _Outputs(token_loss, u, w, dX, dW, r_all)


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


def _project_chunk(head: _Head, o: _Outputs, logits, x, u_c, s: int, e: int) -> None:
    """u and w of rows ``[s, e)``: u as the CE pass (fused) or the dX GEMM (augmented) gave it, or from one more
    pass over the δ chunk (gemm, tiled); ``w = x P2ᵀ``."""
    if head.method in ("gemm", "tiled"):   # one more pass over the δ chunk
        u_c = proj_u_triton(logits, head.p1t) if head.method == "tiled" else proj_u_torch(logits, head.p1t)
    if head.method != "fused" and head.p1_scale != 1.0:   # the CE pass scales its own u
        u_c.mul_(head.p1_scale)
    o.u[s:e] = u_c
    torch.mm(x.float(), head.p2t, out=o.w[s:e])
    if head.p2_scale != 1.0:
        o.w[s:e].mul_(head.p2_scale)


def _chunk(head: _Head, o: _Outputs, hidden, labels, s: int, e: int, scale, ignore_index, row_weights,
           chunk_tokens: int) -> None:
    """Rows ``[s, e)``: the logits GEMM, the CE pass (δ over the logits), dX, u and w, the row weights, dW. The
    chunk's logits are freed on return, before the next chunk's are allocated (peak = one chunk)."""
    x = hidden[s:e]
    logits_full = torch.mm(x, head.w_c.t())
    logits = logits_full[:, :head.V] if head.V_pad != head.V else logits_full
    tl_c, u_c = head.ce(logits, labels[s:e], scale, ignore_index, head.p1t if head.method == "fused" else None,
                        head.p1_scale)
    o.token_loss[s:e] = tl_c
    if o.dX is not None:
        if head.w_aug is not None:       # one GEMM gives [dX | u]
            d = x.shape[1]
            dx_u = torch.mm(logits_full, head.w_aug)
            o.dX[s:e] = dx_u[:, :d]
            u_c = dx_u[:, d:].float()
            del dx_u
        else:
            torch.mm(logits_full, head.w_c, out=o.dX[s:e])
    if o.u is not None:
        _project_chunk(head, o, logits, x, u_c, s, e)
    if o.r_all is not None:  # weighted rows: dX_t = r_t Wᵀδ_t, dW += δᵀ (r x)
        o.r_all[s:e] = _row_weights_of(row_weights, s, e, o.u, o.w, hidden.device)
        x = x * o.r_all[s:e, None].to(x.dtype)
        if o.dX is not None:
            o.dX[s:e].mul_(o.r_all[s:e, None].to(o.dX.dtype))
    if o.dW is not None:
        accumulate_mm_(o.dW, logits.t(), x, block_rows=chunk_tokens)


"""The projection of δ: ``u = p1_scale · δ P1ᵀ`` ``[C, k1]`` fp32 from a δ chunk ``[C, V]``, for the ``u_method``s
that compute it outside the CE pass.

Four places can compute ``u`` (:data:`megamix.kernels.fused_linear_ce.U_METHODS`); the logits GEMM, the CE pass
that writes δ and the dW GEMM are the same code for all four, so δ, the loss and dW never depend on it:

- ``fused`` (default): inside the CE pass (:mod:`megamix.kernels.ce_pass`); every 16-row program streams all of
  P1ᵀ.
- ``gemm``: the CE pass without P1, then one GEMM ``δ_chunk @ P1ᵀ`` (:func:`proj_u_torch`: cuBLAS with an fp32
  output on CUDA): one more read of the δ chunk.
- ``augmented``: ``W_aug = [W | P1ᵀ]`` (``[V, d+k1]``, built once per call: one extra copy of W in memory)
  and one GEMM ``δ @ W_aug = [dX | u]``: no extra pass over δ and k1/d more FLOPs in the dX GEMM; u comes out
  in the GEMM's dtype (bf16 in bf16 training). The wider GEMM may pick another kernel, so dX may differ from
  the other methods in its last bits (within the tolerance table). Without a dX GEMM (no grad, or pass 1 of
  the two-pass row-weight path) it computes u like ``gemm``.
- ``tiled``: the CE pass without P1, then :func:`proj_u_triton`: 128-row tiles (P1ᵀ streamed once per 128
  rows) and V split across programs, fp32 partials summed in a fixed order (Triton backend only).

Which is fastest depends on the GPU; ``kernels/bench/bench_fused_lce.py --u-methods`` measures them side by
side against the step's three-GEMM floor (``kernels/bench/results/SUMMARY.md``).

Layout: reference → Triton kernel → launcher (owns the checks) → torch path.
"""
from __future__ import annotations

import torch

from megamix.kernels import launch_configs
from megamix.kernels.ce_pass import _check_triton_dtype
from megamix.kernels.projection import mm_fp32
from megamix.kernels.utils import HAS_TRITON, cdiv, interpreting, next_pow2, tl, triton


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def proj_u_ref(delta: torch.Tensor, p1t: torch.Tensor, p1_scale: float = 1.0) -> torch.Tensor:
    """``u = p1_scale · δ P1ᵀ`` in fp32 from fp32 copies of both operands."""
    return p1_scale * (delta.float() @ p1t.float())


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
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


# ----------------------------------------------------------------------------------------------
# Launcher (owns the checks)
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Torch path
# ----------------------------------------------------------------------------------------------
def proj_u_torch(delta: torch.Tensor, p1t: torch.Tensor, p1_scale: float = 1.0) -> torch.Tensor:
    """``u_method="gemm"``: one GEMM ``δ @ P1ᵀ`` with an fp32 result (:func:`~megamix.kernels.projection.mm_fp32`;
    on CUDA cuBLAS with an fp32 output for bf16/fp16 operands), then ``p1_scale``; the contract of
    :func:`proj_u_triton`."""
    u = mm_fp32(delta, p1t)
    return u.mul_(p1_scale) if p1_scale != 1.0 else u


def u_operand_dtype(method: str, backend: str, cdt: torch.dtype) -> torch.dtype:
    """The dtype of the P1ᵀ operand ``u_method`` ``method`` computes ``u`` with, when the head's GEMMs run in
    ``cdt``: ``augmented`` a column block of the dX GEMM's operand (``cdt``); ``fused`` the logits dtype in the
    Triton CE pass, else fp32; ``gemm`` / ``tiled`` a GEMM on δ as stored (in the logits dtype)."""
    low = cdt in (torch.bfloat16, torch.float16)
    if method == "augmented":
        return cdt
    if method == "fused":
        return cdt if (backend == "triton" and low) else torch.float32
    return cdt if low else torch.float32


__all__ = ["proj_u_ref", "proj_u_triton", "proj_u_torch", "u_operand_dtype"]

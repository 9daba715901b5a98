"""Segmented per-sample reduction ``g_i = Σ_{t∈i} u_t w_tᵀ`` of the factored projections ``u [N,k1]``, ``w [N,k2]``.

Samples are given either as a per-token ``sample_index [N]`` (tokens with index < 0 are skipped,
e.g. padding), for packed documents as ``offsets [B+1]`` (sample ``i`` owns tokens
``offsets[i]:offsets[i+1]``), or as ``tokens_per_sample`` for ``B`` equal-length samples (training's form: one
batched GEMM). The Triton kernel runs one program per segment and accumulates ``tl.dot(U_segᵀ, W_seg)`` tiles
in fp32 with no atomics (deterministic).

Layout: reference → Triton kernel → launchers → public function.
"""
from __future__ import annotations

import torch

from megamix.kernels import launch_configs
from megamix.kernels.utils import HAS_TRITON, interpreting, next_pow2, no_autocast, resolve_backend, tl, triton


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def per_sample_grads_ref(u: torch.Tensor, w: torch.Tensor, sample_index: torch.Tensor,
                         num_samples: int) -> torch.Tensor:
    """Materialised reference: ``g [B, k1*k2]`` from per-token outer products (fp64 accumulation)."""
    sample_index = sample_index.to(u.device)
    keep = sample_index >= 0
    outer = (u[keep].double()[:, :, None] * w[keep].double()[:, None, :]).reshape(int(keep.sum()), -1)
    g = torch.zeros(num_samples, u.shape[1] * w.shape[1], dtype=torch.float64, device=u.device)
    g.index_add_(0, sample_index[keep].long(), outer)
    return g.to(u.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _segment_outer_kernel(u_ptr, stride_u, w_ptr, stride_w, order_ptr, offs_ptr, out_ptr, K1, K2,
                              HAS_ORDER: tl.constexpr, BT: tl.constexpr, BK1: tl.constexpr,
                              BK2: tl.constexpr, DOT_PREC: tl.constexpr):
        """Program ``s`` writes ``out[s] = Σ_{t in segment s} u_t w_tᵀ`` (row-major k1×k2)."""
        seg = tl.program_id(0)
        start = tl.load(offs_ptr + seg)
        end = tl.load(offs_ptr + seg + 1)
        k1 = tl.arange(0, BK1)
        k2 = tl.arange(0, BK2)
        acc = tl.zeros([BK1, BK2], tl.float32)
        n_iter = tl.cdiv(end - start, BT)
        for it in range(0, n_iter):
            t = start + it * BT + tl.arange(0, BT)
            tm = t < end
            if HAS_ORDER:
                rows = tl.load(order_ptr + t, mask=tm, other=0).to(tl.int64)
            else:
                rows = t.to(tl.int64)
            ut = tl.load(u_ptr + rows[:, None] * stride_u + k1[None, :], mask=tm[:, None] & (k1 < K1)[None, :],
                         other=0.0)
            wt = tl.load(w_ptr + rows[:, None] * stride_w + k2[None, :], mask=tm[:, None] & (k2 < K2)[None, :],
                         other=0.0)
            acc = tl.dot(tl.trans(ut), wt, acc, input_precision=DOT_PREC)
        out = out_ptr + seg.to(tl.int64) * K1 * K2 + k1[:, None] * K2 + k2[None, :]
        tl.store(out, acc, mask=(k1 < K1)[:, None] & (k2 < K2)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _check_uw(u: torch.Tensor, w: torch.Tensor) -> None:
    if u.dim() != 2 or w.dim() != 2 or u.shape[0] != w.shape[0]:
        raise ValueError(f"u and w must be [N,k1] and [N,k2] with the same N, got {tuple(u.shape)} and "
                         f"{tuple(w.shape)}")
    if u.device != w.device:
        raise ValueError(f"u and w must be on one device, got {u.device} and {w.device}")


def segments_from_index(index: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)``: token ids grouped by segment (stable; index < 0 dropped) and ``[S+1]`` offsets."""
    if index.dim() != 1:
        raise ValueError(f"sample/segment index must be 1-D, got shape {tuple(index.shape)}")
    index = index.long()
    if index.numel() and int(index.max()) >= num_segments:
        raise ValueError(f"index has value {int(index.max())} but num_segments={num_segments}")
    keep = torch.nonzero(index >= 0).squeeze(1)
    idx = index[keep]
    order = keep[torch.argsort(idx, stable=True)]
    counts = torch.bincount(idx, minlength=num_segments)
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=index.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def segment_outer_triton(u: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                         order: torch.Tensor | None = None, *, block_t: int | None = None) -> torch.Tensor:
    """Triton: ``out [S, k1*k2]`` fp32 with ``out[s] = Σ_{j∈[off[s],off[s+1])} u_{ord[j]} w_{ord[j]}ᵀ``."""
    _check_uw(u, w)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("offsets must be a 1-D tensor of S+1 entries")
    u = u.float().contiguous()
    w = w.float().contiguous()
    S = offsets.numel() - 1
    k1, k2 = u.shape[1], w.shape[1]
    out = torch.empty(S, k1 * k2, device=u.device, dtype=torch.float32)
    if S == 0:
        return out
    offs = offsets.to(device=u.device, dtype=torch.int64).contiguous()
    cfg = launch_configs.segment_outer(k1, k2, interpret=interpreting())
    BT = block_t or cfg.block_m
    BK1, BK2 = next_pow2(k1, 16), next_pow2(k2, 16)
    ordr = order.to(device=u.device, dtype=torch.int64).contiguous() if order is not None else offs
    _segment_outer_kernel[(S,)](u, u.stride(0), w, w.stride(0), ordr, offs, out, k1, k2,
                                HAS_ORDER=order is not None, BT=BT, BK1=BK1, BK2=BK2, DOT_PREC="ieee",
                                num_warps=cfg.num_warps,
                                **({"num_stages": cfg.num_stages} if cfg.num_stages and not interpreting() else {}))
    return out


def segment_outer_torch(u: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                        order: torch.Tensor | None = None, *, chunk: int = 1024) -> torch.Tensor:
    """Torch path with the contract of :func:`segment_outer_triton`: segments are scattered into
    zero-padded ``[S, t, k]`` blocks of at most ``chunk`` positions and reduced with one ``bmm`` per
    block (``2·N·k1·k2`` FLOPs; memory ``S·chunk·(k1+k2)`` floats)."""
    _check_uw(u, w)
    S = offsets.numel() - 1
    k1, k2 = u.shape[1], w.shape[1]
    out = torch.zeros(S, k1, k2, device=u.device, dtype=torch.float32)
    offs = offsets.to(u.device).long()
    n = int(offs[-1])
    if S == 0 or n == 0:
        return out.reshape(S, k1 * k2)
    lengths = offs[1:] - offs[:-1]
    seg = torch.repeat_interleave(torch.arange(S, device=u.device), lengths, output_size=n)
    pos = torch.arange(n, device=u.device) - offs[:-1][seg]
    rows = order.to(u.device).long() if order is not None else torch.arange(n, device=u.device)
    uf, wf = u.float(), w.float()
    t_max = int(lengths.max())
    for p0 in range(0, t_max, chunk):
        t = min(chunk, t_max - p0)
        sel = torch.nonzero((pos >= p0) & (pos < p0 + t)).squeeze(1)
        U = torch.zeros(S, t, k1, device=u.device, dtype=torch.float32)
        W = torch.zeros(S, t, k2, device=u.device, dtype=torch.float32)
        U[seg[sel], pos[sel] - p0] = uf[rows[sel]]
        W[seg[sel], pos[sel] - p0] = wf[rows[sel]]
        out.baddbmm_(U.transpose(1, 2), W)
    return out.reshape(S, k1 * k2)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _segment_outer(u, w, offsets, order, backend):
    be = resolve_backend(backend, u.device)
    with no_autocast(u.device):
        return (segment_outer_triton if be == "triton" else segment_outer_torch)(u, w, offsets, order)


def per_sample_grads(u: torch.Tensor, w: torch.Tensor, sample_index: torch.Tensor | None = None,
                     num_samples: int | None = None, *, offsets: torch.Tensor | None = None,
                     tokens_per_sample: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Projected per-sample gradients ``g [B, k1*k2]`` (fp32), ``g_i = Σ_{t∈i} u_t w_tᵀ``.

    Give exactly one of: ``sample_index [N]`` (sample of each token, < 0 = skip) with ``num_samples``;
    ``offsets [B+1]`` for contiguous (packed) samples; or ``tokens_per_sample=T`` when the ``N = B·T`` rows are
    ``B`` consecutive samples of ``T`` tokens each (a loader micro-batch ``[B, T]``), which is one batched GEMM
    ``[B, k1, T] @ [B, T, k2]`` with no host sync (the other forms read segment bounds on the host). Samples
    need not align with CE chunks.
    """
    _check_uw(u, w)
    if tokens_per_sample is not None:
        if sample_index is not None or offsets is not None:
            raise ValueError("give exactly one of sample_index (with num_samples), offsets or tokens_per_sample")
        T = int(tokens_per_sample)
        if T < 1 or u.shape[0] % T:
            raise ValueError(f"tokens_per_sample={tokens_per_sample} must be >= 1 and divide the {u.shape[0]} rows")
        B = u.shape[0] // T
        k1, k2 = u.shape[1], w.shape[1]
        with no_autocast(u.device):      # fp32 statistics, also inside a caller's autocast region
            return torch.bmm(u.float().reshape(B, T, k1).transpose(1, 2),
                             w.float().reshape(B, T, k2)).reshape(B, k1 * k2)
    if (sample_index is None) == (offsets is None):
        raise ValueError("give exactly one of sample_index (with num_samples) or offsets")
    if offsets is not None:
        if offsets.dim() != 1 or int(offsets[0]) != 0 or int(offsets[-1]) > u.shape[0] or \
                bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"offsets must be non-decreasing, start at 0 and end <= N={u.shape[0]}")
        return _segment_outer(u, w, offsets, None, backend)
    if num_samples is None or num_samples < 0:
        raise ValueError("num_samples (>= 0) is required with sample_index")
    if sample_index.shape[0] != u.shape[0]:
        raise ValueError(f"sample_index has {sample_index.shape[0]} entries but u has {u.shape[0]} rows")
    order, offs = segments_from_index(sample_index.to(u.device), num_samples)
    return _segment_outer(u, w, offs, order, backend)


__all__ = ["per_sample_grads", "per_sample_grads_ref", "segment_outer_triton", "segment_outer_torch",
           "segments_from_index"]

"""The CE pass of the chunked fused linear cross-entropy: one logits chunk ``[C, V]`` becomes δ *in place*, with
the per-row loss and, when a projection is given, ``u = δ P1ᵀ``.

For the rows of a chunk with labels ``y`` and loss scale ``s`` (``1/n_valid`` or 1; 0 where ``y`` is ignored)::

    lse = log Σ_v exp(z_v),   loss = lse - z_y,   δ = s (softmax(z) - onehot(y)),   u = p1_scale · δ P1ᵀ

The Triton kernel :func:`_ce_delta_proj_kernel` gives each program BM rows and sweeps V twice: online max /
sum-exp (:func:`_row_max_sumexp`), then δ written over the logits with ``u`` accumulated by ``tl.dot`` over V tiles
(:func:`_delta_sweep`). The two sweeps are ``@triton.jit`` helpers, inlined by the compiler; the vocab-parallel
passes (:mod:`megamix.kernels.vocab_parallel`) run them as two kernels with the TP all-reduces in between. The
torch twin :func:`ce_delta_torch` has the same contract (it works through blocks of rows, never holding an fp32
copy of a whole bf16 chunk).

Layout: Triton kernels → launcher (owns the shape / dtype checks) → torch twin. The reference is the full-logits
:func:`megamix.kernels.fused_linear_ce.fused_linear_cross_entropy_ref`.
"""
from __future__ import annotations

import torch

from megamix.kernels import launch_configs
from megamix.kernels.utils import HAS_TRITON, cdiv, interpreting, next_pow2, tl, triton


# ----------------------------------------------------------------------------------------------
# Triton kernels. The two sweeps over V are @triton.jit helpers (inlined by the compiler):
#   _row_max_sumexp: online max / sum-exp of BM rows;  _delta_sweep: δ in place (+ u = δ P1ᵀ).
# _ce_delta_proj_kernel runs both; the vocab-parallel kernels (vocab_parallel.py) run them one each.
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


# ----------------------------------------------------------------------------------------------
# Launcher (owns the shape / dtype checks)
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


# ----------------------------------------------------------------------------------------------
# Torch twin (the same contract as the launcher)
# ----------------------------------------------------------------------------------------------
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


__all__ = ["ce_delta_triton", "ce_delta_torch", "scale_tensor"]

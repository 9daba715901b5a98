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

Four places can compute ``u = δ P1ᵀ`` (``u_method``, :data:`U_METHODS`): inside the CE pass (``fused``, the
default), one more GEMM on each δ chunk (``gemm``), extra columns of the dX GEMM (``augmented``) or a tiled Triton
kernel (``tiled``); see :mod:`megamix.kernels.proj_u`. The logits GEMM, the CE pass that writes δ and the dW GEMM
are the same code for all four, so δ, the loss and dW never depend on it.

Vocab-parallel variant (:func:`vocab_parallel_fused_linear_cross_entropy`, Megatron-style tensor parallelism): TP
rank ``r`` holds the vocab shard ``W_r`` and the replicated hidden states; each chunk's CE pass is the distributed
softmax of :mod:`megamix.kernels.vocab_parallel` (two passes with the TP all-reduces in between), and after the last
chunk ``u`` and (by default) ``dX`` are all-reduced over the TP group once.

Modules: :mod:`~megamix.kernels.ce_pass` (the CE pass: Triton kernel and torch twin), :mod:`~megamix.kernels.proj_u`
(``u = δ P1ᵀ`` outside the CE pass), :mod:`~megamix.kernels.vocab_parallel` (the vocab-parallel CE pass),
:mod:`~megamix.kernels.lce_chunk` (one chunk: its GEMMs, CE pass and projections). Layout of this file: reference →
the backward's scaling kernel and its launcher → chunked driver (both variants) → autograd.Function → public
:func:`fused_linear_cross_entropy`, :func:`vocab_parallel_fused_linear_cross_entropy`, :func:`token_cross_entropy`.
The CE passes, ``proj_u_triton`` and the vocab-parallel reference are re-exported here under their old names.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from megamix.kernels import launch_configs
from megamix.kernels.ce_pass import _check_triton_dtype, _row_blocks, ce_delta_torch, ce_delta_triton, scale_tensor
from megamix.kernels.lce_chunk import _allocate, _chunk, _head_operands, _row_weights_of
from megamix.kernels.projection import Projection
from megamix.kernels.proj_u import proj_u_triton
from megamix.kernels.utils import HAS_TRITON, all_reduce_, cdiv, group_size, interpreting, resolve_backend, tl, triton
from megamix.kernels.vocab_parallel import (VocabShard, ce_shard_delta_torch, ce_shard_delta_triton,
                                            ce_shard_stats_torch, ce_shard_stats_triton, ce_vocab_parallel,
                                            vocab_parallel_cross_entropy_ref)

REDUCTIONS = ("mean", "sum")
#: Where ``u = δ P1ᵀ`` is computed (δ, the loss, dX and dW are the same for all four, see the module docstring):
#: ``fused`` inside the CE pass (``tl.dot`` over V tiles, 16-row programs); ``gemm`` one more GEMM on each δ chunk
#: (cuBLAS, fp32 output); ``augmented`` as extra columns of the dX GEMM, ``δ [W | P1ᵀ] = [dX | u]``; ``tiled``
#: a Triton kernel over each δ chunk with 128-row tiles and V split across programs (Triton backend only).
U_METHODS = ("fused", "gemm", "augmented", "tiled")


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


# ----------------------------------------------------------------------------------------------
# Triton kernel: the backward's in-place scaling
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
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
# Launcher
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Chunked driver (shared by both backends and by the vocab-parallel variant; one chunk: lce_chunk.py)
# ----------------------------------------------------------------------------------------------
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


def _loss_scale(labels, ignore_index, reduction, dev):
    """(n_valid, the loss scale s): for ``mean`` ``1/n_valid`` (0 without a valid token), both on the device (no
    host sync); for ``sum`` 1.0."""
    valid = labels != ignore_index
    n_valid = valid.sum()        # stays on the device: no host sync
    if reduction == "mean":
        scale = torch.where(n_valid > 0, 1.0 / n_valid.clamp_min(1).to(torch.float32),
                            torch.zeros((), device=dev, dtype=torch.float32))
    else:
        scale = 1.0
    return n_valid, scale


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
    N = hidden.shape[0]
    n_valid, scale = _loss_scale(labels, ignore_index, reduction, hidden.device)
    head = _head_operands(hidden, weight, projection, backend, need_dx, shard, u_method)
    o = _allocate(hidden, weight, projection, need_dx, need_dw, row_weights is not None)
    for s in range(0, N, chunk_tokens):
        _chunk(head, o, hidden, labels, s, min(N, s + chunk_tokens), scale, ignore_index, row_weights, chunk_tokens)
    del head                 # W_c / W_aug go before the collectives
    if shard is not None:  # one collective each for the whole call, not one per chunk
        if o.u is not None:
            all_reduce_(o.u, "sum", shard.group)
        if o.dX is not None and shard.reduce_dx:
            all_reduce_(o.dX, "sum", shard.group)
    if o.r_all is not None:
        loss = _weighted_loss(o.token_loss, o.r_all, labels, ignore_index, reduction)
    elif reduction == "mean":
        loss = o.token_loss.sum() / n_valid     # 0/0 = NaN for a call with no valid token
    else:
        loss = o.token_loss.sum()
    return loss, o.token_loss, o.u, o.w, o.dX, o.dW


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


__all__ = ["LinearCEOutput", "VocabShard", "U_METHODS", "proj_u_triton", "head_dtype", "head_input", "scale_",
           "token_cross_entropy", "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
           "vocab_parallel_fused_linear_cross_entropy", "vocab_parallel_cross_entropy_ref",
           "ce_delta_triton", "ce_delta_torch", "ce_shard_stats_triton", "ce_shard_stats_torch",
           "ce_shard_delta_triton", "ce_shard_delta_torch", "ce_vocab_parallel"]

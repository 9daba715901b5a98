"""Megatron-LM / Megatron-core wiring, with or without tensor parallelism (TP).

Megatron's ``GPTModel.output_layer`` is a ``ColumnParallelLinear``: it is fed ``[s, b, h]`` and, with TP,
TP rank ``r`` holds the vocab shard ``W_r = W[s_r:e_r]`` of the padded vocabulary and produces only the
logits shard ``[s, b, V/tp]``. There are two ways to feed a :class:`~megamix.mixer.Mixer` from it:

- **capture** (keep Megatron's loss): :func:`attach_megatron` = :func:`megamix.integrations.attach` plus,
  with TP, :func:`vocab_parallel_capture`: the hook reads ``δ_r = dL/dz_r`` from Megatron's own
  ``vocab_parallel_cross_entropy`` backward, and ``u = Σ_r δ_r P1[:, s_r:e_r]ᵀ`` is all-reduced over TP.
- **fused** (megamix owns the loss): :func:`vocab_parallel_lm_head_loss` replaces ``output_layer`` +
  ``vocab_parallel_cross_entropy`` by :func:`megamix.kernels.fused_linear_ce.vocab_parallel_fused_linear_cross_entropy`
  (no ``[s, b, V/tp]`` logits are kept) and records the statistics.

Either way ``g_i = Σ_t u_t w_tᵀ`` (then ``projection.finalize``) is the full, unsharded projected
per-sample gradient and is **identical on every TP rank** of a data-parallel (DP) rank: ``u`` is
all-reduced over TP and ``w = P2 a`` uses the replicated hidden states. Statistics are therefore counted
once per DP rank, not once per TP rank: every TP rank keeps its own Mixer, built with the *data-parallel*
rank, world size and group (``mpu.get_data_parallel_rank/world_size/group``). The Mixer all-reduces its
accumulators only over that DP group, which holds exactly one rank per DP index (the ranks sharing this
rank's TP/PP position), so TP ranks never add into each other and all of them end every round with the
same statistics and the same new weights. The loaders of the TP ranks of one DP rank draw the same
batches because the sample stream depends only on (seed, weight history, DP rank).

The projection covers the **padded** vocabulary (``args.padded_vocab_size``): padded rows are ordinary
rows of the softmax in Megatron, and labels never point at them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megamix.kernels.fused_linear_ce import head_input, vocab_parallel_fused_linear_cross_entropy
from megamix.kernels.projection import Projection
from megamix.kernels.utils import all_reduce_, group_size
from megamix.integrations.hook import GradCallback, LMHeadGradCapture, MixerHook, attach, find_lm_head


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """``[start, end)`` of TP rank ``tp_rank``'s vocab shard (Megatron's equal split).

    ``vocab_size`` must be the padded vocabulary (divisible by ``tp_size``), as Megatron pads it.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel position rank={tp_rank} size={tp_size}: need 0 <= rank < size")
    if vocab_size % tp_size != 0:
        raise ValueError(f"vocab size {vocab_size} is not divisible by the TP size {tp_size}; pad the "
                         "vocabulary (Megatron: --make-vocab-size-divisible-by) and build P1 for the padded size")
    per = vocab_size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


def _tp_position(group: Any) -> tuple[int, int]:
    """(rank, size) of this process in the TP group (0, 1 without torch.distributed)."""
    size = group_size(group)
    return (dist.get_rank(group) if size > 1 else 0), size


def _check_shard(vocab_start: int, vocab_end: int, shard_rows: int, tp_group: Any) -> int:
    """Check that ``[vocab_start, vocab_end)`` is this rank's equal vocab shard of ``shard_rows`` rows;
    return the padded vocabulary size."""
    if vocab_end - vocab_start != shard_rows:
        raise ValueError(f"vocab range [{vocab_start}, {vocab_end}) has {vocab_end - vocab_start} rows but the "
                         f"weight shard has {shard_rows}; pass this rank's range (vocab_range(V, tp_rank, tp_size))")
    rank, size = _tp_position(tp_group)
    V = shard_rows * size
    if vocab_range(V, rank, size) != (vocab_start, vocab_end):
        raise ValueError(f"vocab range [{vocab_start}, {vocab_end}) is not TP rank {rank}'s shard of the padded "
                         f"vocabulary {V} ({size} ranks): expected {vocab_range(V, rank, size)}; is tp_group the "
                         "tensor-parallel group?")
    return V


# ----------------------------------------------------------------------------------------------
# Capture path (Megatron keeps its loss)
# ----------------------------------------------------------------------------------------------
def vocab_parallel_capture(lm_head_shard: nn.Module | None, projection: Projection, callback: GradCallback, *,
                           vocab_start: int, vocab_end: int, group: Any = None, chunk_tokens: int = 4096,
                           backend: str = "auto", seq_first: bool = True,
                           grad_weights: Any = None) -> LMHeadGradCapture:
    """Attach a capture to a vocab-parallel LM-head shard.

    Args:
        lm_head_shard: the module producing this rank's logits shard (Megatron's ``output_layer``, or an
            ``nn.Linear`` holding ``W[vocab_start:vocab_end]``); None: call ``capture.tap(hidden, logits)``.
        projection: the full projection (``P1 [k1, V_padded]``, ``P2 [k2, d]``), identical on all ranks.
        callback: ``callback(g, context)``; ``g [B, projection.k]`` is the full (unsharded) projected
            per-sample gradient (after ``projection.finalize``), identical on every TP rank.
        vocab_start, vocab_end: this rank's vocab range (see :func:`vocab_range`).
        group: the tensor-parallel process group (None = default group).
        chunk_tokens, backend: as in :class:`~megamix.integrations.hook.LMHeadGradCapture`.
        seq_first: Megatron's ``[s, b, ...]`` layout (default); False for ``[b, s, ...]``.
        grad_weights: as in :class:`~megamix.integrations.hook.LMHeadGradCapture` (per-sample factors of
            this shard's logits gradient; ``g`` is identical on every TP rank, so the factors are too).

    All TP ranks must run the backward together (they do in Megatron): ``u`` is all-reduced inside it.
    """
    V = projection.V
    if not 0 <= vocab_start < vocab_end <= V:
        raise ValueError(f"vocab range [{vocab_start}, {vocab_end}) is outside P1's {V} columns; build the "
                         "projection for the full padded vocabulary")
    shard = Projection(projection.P1[:, vocab_start:vocab_end].contiguous(), projection.P2, projection.R,
                       projection.kind, projection.seed)

    def all_reduce_u(u: torch.Tensor) -> torch.Tensor:
        return all_reduce_(u.contiguous(), "sum", group)

    return LMHeadGradCapture(lm_head_shard, shard, callback, chunk_tokens=chunk_tokens, backend=backend,
                             seq_first=seq_first, u_transform=all_reduce_u, grad_weights=grad_weights)


def _megatron_head_shape(head: nn.Module) -> tuple[int, int]:
    """(padded V, d) of a Megatron ``ColumnParallelLinear`` (its weight may be None when tied)."""
    V, d = getattr(head, "output_size", None), getattr(head, "input_size", None)
    if not (isinstance(V, int) and isinstance(d, int)):
        raise ValueError(f"{type(head).__name__} has no output_size/input_size: pass a Megatron "
                         "ColumnParallelLinear output layer, or use megamix.integrations.attach(model, mixer, "
                         "vocab_size=..., hidden_size=...) for other heads")
    return V, d


def attach_megatron(model: nn.Module, mixer: Any, *, tp_group: Any = None, dp_world_size: int | None = None
                    ) -> MixerHook:
    """The capture path on a Megatron-core ``GPTModel`` (or a wrapper of it), with any TP size.

    :func:`megamix.integrations.attach` on ``model.output_layer`` (layout ``[s, b, h]``; the full padded
    vocabulary and hidden size come from the layer, so tied embeddings, whose ``output_layer.weight`` is
    None, work too); with TP > 1 the hook's capture is replaced by :func:`vocab_parallel_capture` on this
    rank's shard. Call ``hook.set_batch(batch)`` before each forward and ``hook.after_optimizer_step(step)``
    after each optimizer step, as with :func:`~megamix.integrations.attach`.

    Args:
        tp_group: the tensor-parallel group (default: the layer's ``tp_group``, else the default group).
        dp_world_size: data-parallel size for the gradient-averaging scale (default ``mixer.world_size``).

    Idempotent like :func:`~megamix.integrations.attach`: a second call with the same mixer returns the
    same hook.

    Sequence parallelism with TP > 1 is rejected: the layer's input is then a sequence shard while its
    logits cover the full sequence; use :func:`vocab_parallel_lm_head_loss` there.
    """
    head, seq_first = find_lm_head(model)
    V, d = _megatron_head_shape(head)
    if tp_group is None:
        tp_group = getattr(head, "tp_group", None)
    rank, size = _tp_position(tp_group)
    if size > 1 and getattr(head, "sequence_parallel", False):
        raise ValueError("attach_megatron: the output layer runs with sequence parallelism (its input is "
                         "[s/tp, b, h]), which the capture cannot pair with the [s, b, V/tp] logits; use the fused "
                         "path (vocab_parallel_lm_head_loss on the gathered hidden states) or disable "
                         "--sequence-parallel")
    hook = attach(model, mixer, lm_head=head, seq_first=seq_first, dp_world_size=dp_world_size,
                  vocab_size=V, hidden_size=d)
    if size == 1:
        return hook
    old = hook.capture          # built by attach() for the full vocabulary (or by an earlier call: idempotent)
    old.remove()
    start, end = vocab_range(V, rank, size)
    hook.capture = vocab_parallel_capture(head, mixer.head.projection_for(V, d), old.callback, vocab_start=start,
                                          vocab_end=end, group=tp_group, chunk_tokens=old.chunk_tokens,
                                          backend=old.backend, seq_first=seq_first, grad_weights=old.grad_weights)
    return hook


# ----------------------------------------------------------------------------------------------
# Fused path (megamix owns the loss)
# ----------------------------------------------------------------------------------------------
def _batch_first_rows(x: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """Rows of a per-token ``[s*b, k]`` tensor in seq-first order, reordered to batch-first ``[b*s, k]``."""
    return x.reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1)


def vocab_parallel_lm_head_loss(mixer: Any, hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor,
                                domain_ids: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None, *,
                                vocab_start: int, vocab_end: int, tp_group: Any = None, seq_first: bool = True,
                                reduce_dx: bool = True, record: bool = True) -> torch.Tensor:
    """The LM-head loss of a (vocab-parallel) Megatron model through megamix's fused kernel, recording the
    statistics: what a ``pretrain_gpt.py`` fork calls instead of ``output_layer`` +
    ``vocab_parallel_cross_entropy`` when megamix owns the loss.

    Args:
        mixer: the :class:`~megamix.mixer.Mixer` of this DP rank (built with the DP rank/size/group).
        hidden: the output layer's input, ``[s, b, h]`` (``seq_first``, Megatron) or ``[b, s, h]``; the full
            sequence, replicated across the TP group.
        weight_shard: this rank's rows ``W[vocab_start:vocab_end]`` of the LM head (``output_layer.weight``,
            or the word-embedding shard when embeddings are tied).
        labels: next-token targets ``[b, s]`` (Megatron's layout, also when ``hidden`` is seq-first);
            ``-100`` = ignore (set it where Megatron's ``loss_mask`` is 0).
        domain_ids, sample_ids: ``[b]``; ``domain_ids`` is required when statistics are recorded.
        vocab_start, vocab_end: this rank's shard of the padded vocabulary (:func:`vocab_range`).
        tp_group: the tensor-parallel process group (None = default group; one rank = no TP).
        reduce_dx: see :func:`~megamix.kernels.fused_linear_ce.vocab_parallel_fused_linear_cross_entropy`; True
            (default) gives ``hidden`` the full gradient, right when ``hidden`` is the final layer norm's
            output as is. False leaves this rank's partial gradient for a caller whose own op sums it (e.g.
            the hidden states went through ``gather_from_sequence_parallel_region``).
        record: record statistics (only when ``projection.enabled`` and autograd is on).

    Returns the scalar mean cross-entropy over this micro-batch's non-ignored tokens (differentiable w.r.t.
    ``hidden`` and ``weight_shard``), equal on every TP rank. The statistics use the full-vocabulary
    projection ``mixer.head.projection_for(V_padded, h)`` (P1 sliced to the shard inside the kernel, the
    optional second stage applied by ``projection.finalize``) and the same scale as
    :meth:`~megamix.mixer.Mixer.lm_head_loss` (the mean over micro-steps and DP ranks), so every TP rank
    records the same rows as a non-TP run would.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [s, b, h] (seq_first=True) or [b, s, h], got {tuple(hidden.shape)}")
    s, b, d = hidden.shape if seq_first else (hidden.shape[1], hidden.shape[0], hidden.shape[2])
    if tuple(labels.shape) != (b, s):
        raise ValueError(f"labels must be [b={b}, s={s}] (Megatron's batch-first labels, also for seq-first "
                         f"hidden states), got {tuple(labels.shape)}; check seq_first={seq_first}")
    V = _check_shard(vocab_start, vocab_end, weight_shard.shape[0], tp_group)
    record = mixer.head.will_record(domain_ids, record)
    if record and mixer.reweighter is not None:
        raise ValueError("mixing.strategy=dograph weights each sample's gradient, which the vocab-parallel fused "
                         "loss does not do; use the capture path (attach_megatron) or mixing.strategy=dograph-sample")
    hidden = head_input(hidden, weight_shard)
    labels = labels.to(hidden.device, non_blocking=True)
    token_labels = labels.t() if seq_first else labels       # the token order of hidden.reshape(-1, d)
    p = mixer.cfg.projection
    out = vocab_parallel_fused_linear_cross_entropy(
        hidden.reshape(-1, d), weight_shard, token_labels.reshape(-1), vocab_start=vocab_start, group=tp_group,
        ignore_index=-100, reduction="mean", projection=mixer.head.projection_for(V, d, hidden.device) if record else None,
        chunk_tokens=p.chunk_tokens, backend=p.backend, reduce_dx=reduce_dx, u_method=p.u_method)
    if record:
        u, w, token_loss = out.u, out.w, out.token_loss
        if seq_first:
            u, w, token_loss = (_batch_first_rows(t, s, b) for t in (u, w, token_loss[:, None]))
        mixer.head.record(u, w, token_loss.reshape(-1), labels, domain_ids, sample_ids)
    return out.loss


__all__ = ["vocab_range", "vocab_parallel_capture", "attach_megatron", "vocab_parallel_lm_head_loss"]

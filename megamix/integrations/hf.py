"""Hugging Face causal LMs on megamix's fused LM head: the one-line patch.

::

    from megamix.integrations.hf import apply_megamix
    patch = apply_megamix(model, mixer)          # model: GPT-2 / Llama / Mistral / Qwen2 / Qwen3 *ForCausalLM

    for batch in mixer.next_step():
        patch.set_batch(batch)                   # the micro-batch's domains (or pass domain_ids= to forward)
        loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                     shift_labels=batch.labels).loss
        loss.backward()

:func:`apply_megamix` replaces ``forward`` on one model *instance* (not its class). When the call has
``labels`` (HF semantics: shifted inside the model) or ``shift_labels`` (already shifted, as megamix's
loader gives them), the patched forward runs the model body, then
:meth:`megamix.mixer.Mixer.lm_head_loss`: the chunked fused linear cross-entropy that also emits the
projected per-sample gradients ``u = P1 δ``, ``w = P2 a`` into the Mixer's statistics. The full
``[B, T, V]`` logits are never materialised, so the output's ``logits`` is None. Without labels the
original forward runs unchanged (generation, logits for evaluation). ``num_items_in_batch`` (HF
Trainer's gradient-accumulation normalisation) is honoured.

Under DeepSpeed ZeRO-3 the LM-head weight is partitioned and read outside its module's forward, so
:func:`apply_megamix` registers it as an external parameter of the model
(``deepspeed.zero.register_external_parameter``, DeepSpeed's documented way), which gathers it for
the model's forward. Call it after ``deepspeed.initialize`` on ``engine.module``, or before: both work.
"""
from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from megamix.integrations.deepspeed import gathered_parameter, is_zero3_param, register_external
from megamix.integrations.hook import unwrap

_ATTR = "_megamix_fused"

#: Causal-LM classes whose forward is ``lm_head(body(x).last_hidden_state)`` + cross-entropy, with no
#: logit scaling or soft-capping, so the fused head computes exactly the same loss. Tested (tied and
#: untied) in tests/test_integration_hf.py.
SUPPORTED_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                     "Qwen3ForCausalLM")


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` (with the reason) unless the fused head reproduces ``model``'s own loss."""
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise TypeError(f"megamix's fused LM head supports {', '.join(SUPPORTED_CLASSES)}; {name} is not "
                        "among them. Use the capture path instead (megamix.integrations.attach(model, mixer)), "
                        "which works with any model and loss")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise TypeError(f"{name} has config.{attr}={getattr(cfg, attr)!r}: the fused head has no logit "
                            "scaling or soft-capping; use megamix.integrations.attach(model, mixer) instead")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise TypeError(f"{name}'s LM head must be a bias-free nn.Linear for the fused path "
                        f"(got {type(head).__name__}); use megamix.integrations.attach(model, mixer) instead")


def body_hidden_states(model: nn.Module, batch: Any, **model_kwargs) -> torch.Tensor:
    """The LM head's input ``[b, T, d]`` for a loader batch: the model body only (no LM head, no loss), in
    eval mode and without gradients. Under ZeRO-3 every rank must call it (the body's gathers are collective).
    ``model_kwargs`` (e.g. ``attention_mask``) go to the body's forward; None values are dropped."""
    was = model.training
    model.eval()
    try:
        dev = model.get_output_embeddings().weight.device
        with torch.no_grad():
            extra = {k: v for k, v in model_kwargs.items() if v is not None}
            out = model.base_model(input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev),
                                   use_cache=False, **extra)
        return out[0]
    finally:
        model.train(was)


class FusedLMPatch:
    """Handle returned by :func:`patch_causal_lm`.

    Attributes:
        model: the patched model.
        mixer: the :class:`megamix.mixer.Mixer` receiving the statistics.
        weight_context: ``f(weight) -> context manager yielding the full weight``; the default yields the
            weight itself. DeepSpeed ZeRO-3 sets a gather (used only outside the model's forward, for the
            held-out gradients).
        calls: number of fused-loss forwards run.
    """

    path = "fused"

    def __init__(self, model: nn.Module, mixer: Any):
        self.model = model
        self.mixer = mixer
        self.context: Any = None
        self.calls = 0
        self.weight_context: Callable[[torch.Tensor], Any] = contextlib.nullcontext
        self._removed = False

    # ------------------------------------------------------------------ per micro-step
    def set_batch(self, batch: Any) -> None:
        """Bind the next forwards to a loader batch (its ``domain_ids`` and ``sample_ids``)."""
        if getattr(batch, "domain_ids", None) is None:
            raise ValueError("set_batch needs a batch with domain_ids (a megamix loader Batch)")
        self.context = batch

    @property
    def weight(self) -> torch.Tensor:
        """The LM-head matrix ``[V, d]`` (the input embedding when tied)."""
        return self.model.get_output_embeddings().weight

    def hidden_states(self, batch: Any) -> torch.Tensor:
        """The LM head's input for a loader batch (see :func:`body_hidden_states`)."""
        return body_hidden_states(self.model, batch)

    def eval_gradients(self, hidden_fn: Callable | None = None) -> tuple:
        """Held-out projected gradients through the run's projection (``Mixer.eval_gradients``)."""
        return self.mixer.head.eval_gradients(hidden_fn or self.hidden_states,
                                         lambda: self.weight_context(self.weight))

    def remove(self) -> None:
        """Restore the model's own forward (idempotent)."""
        if self._removed:
            return
        self._removed = True
        if "forward" in vars(self.model):
            del self.model.forward
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    # ------------------------------------------------------------------ the forward
    def forward(self, input_ids: torch.Tensor | None = None, *args, labels: torch.Tensor | None = None,
                shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                domain_ids: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None, **kwargs):
        model = self.model
        cls_forward = type(model).forward
        if labels is None and shift_labels is None:
            return cls_forward(model, input_ids, *args, **kwargs)
        if args:
            raise TypeError("megamix's fused forward takes the model inputs by keyword (input_ids may be "
                            "positional)")
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        out = model.base_model(input_ids=input_ids, **kwargs)
        hidden = out[0]
        if shift_labels is None:  # HF semantics: position t predicts labels[t + 1]
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        if domain_ids is None and self.context is not None:
            domain_ids = self.context.domain_ids
            sample_ids = getattr(self.context, "sample_ids", None)
        W = self.weight
        if W.numel() == 0:
            raise RuntimeError("megamix: the LM-head weight is partitioned (DeepSpeed ZeRO-3) inside the forward; "
                               "patch the model with megamix.integrations.hf.apply_megamix, which registers it "
                               "with DeepSpeed")
        self.calls += 1
        loss = self.mixer.lm_head_loss(hidden, W, shift_labels, domain_ids, sample_ids,
                                       num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))


def patch_causal_lm(model: nn.Module, mixer: Any) -> FusedLMPatch:
    """Make ``model``'s training loss megamix's fused LM head with statistics. Idempotent per mixer.

    ``model`` must be one of :data:`SUPPORTED_CLASSES` (checked). Patching again with the same mixer
    returns the existing handle; with another mixer the old patch is replaced.
    """
    check_supported(model)
    old = getattr(model, _ATTR, None)
    if old is not None:
        if old.mixer is mixer:
            return old
        old.remove()
    patch = FusedLMPatch(model, mixer)

    def _forward(_self, *a, **k):
        return patch.forward(*a, **k)

    # Show the class forward's signature: the HF Trainer reads it to decide which dataset columns to keep.
    # Use __signature__, not __wrapped__, so unwrapping helpers (accelerate's) stop at the patch.
    _forward.__signature__ = inspect.signature(type(model).forward)
    model.forward = types.MethodType(_forward, model)
    setattr(model, _ATTR, patch)
    return patch


def apply_megamix(model: nn.Module, mixer: Any) -> FusedLMPatch:
    """The one-line patch: ``model``'s training loss becomes megamix's fused LM head with statistics.

    ``model``: a Hugging Face causal LM of :data:`SUPPORTED_CLASSES` (tied or untied embeddings), or a
    DeepSpeed engine / DDP wrapper around one. Returns the :class:`FusedLMPatch` (``set_batch``,
    ``remove``). Idempotent per mixer.
    """
    model = unwrap(model)
    patch = patch_causal_lm(model, mixer)
    W = patch.weight
    if is_zero3_param(W):
        register_external(model, W)
        patch.weight_context = gathered_parameter
    return patch


def patched(model: nn.Module) -> FusedLMPatch | None:
    """The fused patch on ``model``, if any."""
    return getattr(model, _ATTR, None)


__all__ = ["SUPPORTED_CLASSES", "FusedLMPatch", "apply_megamix", "body_hidden_states", "check_supported",
           "patch_causal_lm", "patched"]

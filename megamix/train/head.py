"""The loop's LM head: the model's loss on one of the three paths (``train.loss_impl``), recording the
statistics through the Mixer's LM-head driver (:mod:`megamix.lm_head`).

- ``fused`` (default): megamix's chunked fused linear cross-entropy through the Hugging Face patch
  (:func:`megamix.integrations.hf.apply_megamix`): no ``[B, T, V]`` logits, and the projected per-sample
  gradients come out of the cross-entropy pass (Triton on GPU). A model class the patch does not support falls
  back to ``capture`` (logged, and recorded as the path that ran).
- ``capture``: the model's own logits + cross-entropy, with the capture hook (:func:`megamix.integrations.attach`)
  reading δ in the backward.
- ``torch``: the model's own logits + cross-entropy, no statistics (static mixing only; the baseline for overhead
  measurements).

The Hugging Face Trainer adapter (:mod:`megamix.integrations.hf_trainer`) binds its batches through the same
:meth:`LMHead.bind` as this loop.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from megamix.config import MegamixConfig
from megamix.integrations.hf import apply_megamix, body_hidden_states, check_supported
from megamix.integrations.hook import attach
from megamix.train.backend import Backend
from megamix.train.model import model_inputs

log = logging.getLogger("megamix")


class HeadBinding:
    """A model's LM-head statistics path, the fused patch or the capture hook (or neither: ``torch``), and the
    micro-batch its next forward belongs to. The loop's :class:`LMHead` and the Hugging Face adapter's
    :class:`~megamix.integrations.hf_trainer.MegamixFeed` both bind their batches through it.

    Args:
        patch: the model's :func:`~megamix.integrations.hf.apply_megamix` patch, or None.
        hook: the capture hook (:func:`~megamix.integrations.attach`), or None.
        owns_patch: :meth:`remove` removes the patch too (False when the caller applied it and keeps it).
    """

    def __init__(self, patch: Any = None, hook: Any = None, *, owns_patch: bool = True):
        self.patch, self.hook, self.owns_patch = patch, hook, owns_patch

    @property
    def path(self) -> str:
        return "fused" if self.patch is not None else "capture" if self.hook is not None else "torch"

    def bind(self, batch) -> None:
        """The next forward computes ``batch`` (its domain and sample ids reach the statistics)."""
        if self.patch is not None:
            self.patch.set_batch(batch)
        elif self.hook is not None:
            self.hook.set_batch(batch)

    def record_loss(self, token_loss: torch.Tensor, labels: torch.Tensor) -> None:
        """Capture path: the per-token train loss of the bound batch, computed from the model's own logits."""
        if self.hook is not None:
            self.hook.record_loss(token_loss, labels)

    def remove(self) -> None:
        if self.patch is not None and self.owns_patch:
            self.patch.remove()
        if self.hook is not None:
            self.hook.remove()


class LMHead:
    """The LM-head loss of the loop for one of the three paths (see the module docstring)."""

    def __init__(self, cfg: MegamixConfig, backend: Backend, mixer: Any):
        self.backend = backend
        self.vocab_size = backend.model.config.vocab_size
        self.doc_masking = cfg.model.doc_masking
        patch = hook = None
        path = cfg.train.loss_impl
        if path == "fused":
            try:
                check_supported(backend.model)
            except TypeError as e:
                log.warning("megamix: %s; falling back to the capture path", e)
                path = "capture"
        if path == "fused":
            patch = apply_megamix(backend.model, mixer)
        elif path == "capture" and cfg.projection.enabled:
            hook = attach(backend.module, mixer, auto_step=False, dp_world_size=backend.world_size,
                          vocab_size=self.vocab_size, hidden_size=backend.model.config.hidden_size)
        self.binding = HeadBinding(patch, hook)
        self.path = path   # "capture" also with projection off (the model's own loss, nothing recorded)

    def inputs(self, batch) -> dict:
        """The forward's inputs on the device: ids, positions and the document mask (model.doc_masking)."""
        return model_inputs(batch, self.backend.model, self.doc_masking, self.backend.device)

    def loss(self, batch) -> torch.Tensor:
        """Mean token cross-entropy of a micro-batch (statistics recorded on the way); no host sync."""
        kw, labels = self.inputs(batch), batch.labels.to(self.backend.device, non_blocking=True)
        with self.backend.autocast():
            self.binding.bind(batch)
            if self.binding.patch is not None:
                return self.backend.module(**kw, shift_labels=labels, use_cache=False).loss
            logits = self.backend.module(**kw, use_cache=False).logits
        token_loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), labels.reshape(-1),
                                     ignore_index=-100, reduction="none").reshape(labels.shape)
        self.binding.record_loss(token_loss, labels)
        return token_loss.sum() / (labels != -100).sum().clamp(min=1)

    @torch.no_grad()
    def eval_loss_sum(self, batch) -> tuple[torch.Tensor, int]:
        """(summed token loss as a device scalar, number of target tokens) of a validation batch, no statistics."""
        n = int((batch.labels != -100).sum())          # the loader's host labels: no device read
        kw, labels = self.inputs(batch), batch.labels.to(self.backend.device, non_blocking=True)
        with self.backend.autocast():
            if self.binding.patch is not None:
                return self.backend.model(**kw, shift_labels=labels, use_cache=False).loss.detach().double() * n, n
            logits = self.backend.model(**kw, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), labels.reshape(-1), ignore_index=-100,
                               reduction="sum").double(), n

    def hidden_states(self, batch) -> torch.Tensor:
        """The LM head's input for a held-out batch (eval mode, no gradients)."""
        with self.backend.autocast():
            return body_hidden_states(self.backend.model, batch,
                                      attention_mask=self.inputs(batch).get("attention_mask"))

    def weight_context(self):
        """Context yielding the full LM-head matrix (gathered under ZeRO-3)."""
        return self.backend.gathered(self.backend.model.get_output_embeddings().weight)

    def remove(self) -> None:
        self.binding.remove()


__all__ = ["LMHead", "HeadBinding"]

"""Hugging Face Trainer and Accelerate: megamix's loader feeds the batches, the statistics are recorded,
the weights are updated every K steps, and the mixing state is saved and restored with the checkpoints.

An existing ``transformers.Trainer`` script changes in three places::

    mixer = Mixer(cfg, store, rank=args.process_index, world_size=args.world_size)
    apply_megamix(model, mixer)                                     # optional: the fused LM head
    trainer = MegamixTrainer(mixer=mixer, model=model, args=args)   # was Trainer(..., train_dataset=...)
    trainer.train(resume_from_checkpoint=...)                        # unchanged

The pieces, shared by the Trainer and by a loop written directly on ``accelerate.Accelerator``:

- :class:`MegamixFeed` turns the Mixer's micro-batches into model keyword arguments and keeps the
  statistics tied to them. The model is either patched with
  :func:`megamix.integrations.hf.apply_megamix` (fused: its loss is megamix's fused linear
  cross-entropy, which records the statistics) or not patched (capture:
  :func:`megamix.integrations.hook.attach` reads the LM head's gradient in the backward pass). Each
  ``inputs`` dict carries the loader batch under ``"megamix_batch"``. A forward pre-hook on the
  unwrapped model removes it and binds the batch's domains to that forward, so DDP, DeepSpeed and
  Accelerate wrappers pass the dict through unchanged. ``feed.step(step)`` runs ``Mixer.step``.
- :func:`save_state` / :func:`load_state` write and read one ``megamix_rankRRRRR.pt`` file per rank
  in a checkpoint folder (atomically). Each file holds the loader, the strategy and this rank's
  accumulators for the current round.
- :class:`MegamixCallback` calls them from the Trainer's events. ``on_step_end`` runs ``feed.step``,
  ``on_save`` writes into ``checkpoint-N``, and ``on_train_begin`` restores the state on resume.
- :class:`MegamixTrainerMixin` / :class:`MegamixTrainer` supply the data. ``get_batch_samples``, which
  the Trainer calls once per optimizer step to collect its ``gradient_accumulation_steps``
  micro-batches, returns ``mixer.next_step()`` for this rank. ``get_train_dataloader`` returns an
  endless stream of placeholders that nobody reads. Accelerate never wraps, re-shards,
  re-shuffles or prefetches megamix's stream. On resume, the Trainer's skipping of already-seen
  batches consumes only placeholders; the loader continues from its own restored state. A Trainer
  micro-batch is a megamix micro-batch, and a Trainer optimizer step is a megamix step.

The batch geometry comes from the megamix config. ``per_device_train_batch_size`` must equal
``train.micro_batch_size``, and ``gradient_accumulation_steps`` must equal
``train.global_batch_size / (micro_batch_size x world_size)``. ``max_steps`` is required. Settings that
conflict with this are refused with a one-line :class:`~megamix.configbase.ConfigError` that names the
argument and the fix.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from megamix.configbase import ConfigError
from megamix.integrations.deepspeed import gathered_parameter, gradient_accumulation_steps
from megamix.integrations.hf import apply_megamix, body_hidden_states, patched
from megamix.integrations.hook import attach, unwrap
from megamix.io import atomic_path
from megamix.kernels.fused_linear_ce import token_cross_entropy
from megamix.train.head import HeadBinding

#: The key under which :meth:`MegamixFeed.inputs` passes the loader batch to the model call.
BATCH_KEY = "megamix_batch"
#: One file per data-parallel rank in a checkpoint folder (the same name as megamix's own loop uses).
STATE_FILE = "megamix_rank{rank:05d}.pt"
STATE_FORMAT = "megamix.hf_trainer.v1"


# ------------------------------------------------------------------------------------------ state files
def save_state(mixer: Any, folder: str | Path, step: int) -> Path:
    """Write this rank's mixing state (loader, strategy, round accumulators) into ``folder``, atomically.

    Every rank calls it with the same ``folder`` and ``step`` (the number of completed optimizer steps).
    Returns the file written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE.format(rank=mixer.rank)
    state = {"format": STATE_FORMAT, "step": int(step), "rank": mixer.rank, "world_size": mixer.world_size,
             "mixer": mixer.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_state(mixer: Any, folder: str | Path) -> int:
    """Restore the mixing state :func:`save_state` wrote into ``folder``; returns its step."""
    folder = Path(folder)
    path = folder / STATE_FILE.format(rank=mixer.rank)
    if not path.is_file():
        n = len(list(folder.glob("megamix_rank*.pt"))) if folder.is_dir() else 0
        if n:
            raise ConfigError(f"{path} is missing: {folder} holds the mixing state of {n} rank(s) and this run has "
                              f"{mixer.world_size}; resume with the same number of processes")
        raise ConfigError(f"{path} is missing: {folder} holds no megamix state (saved without MegamixCallback, or "
                          "stopped between the model's and megamix's save); resume from another checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not a megamix Trainer/Accelerate state file; resume from a checkpoint "
                          "saved with megamix.integrations.hf_trainer")
    if state["world_size"] != mixer.world_size:
        raise ConfigError(f"{path} was written by a run of {state['world_size']} processes and this run has "
                          f"{mixer.world_size}; resume with the same number of processes")
    mixer.load_state_dict(state["mixer"])
    return int(state["step"])


# ------------------------------------------------------------------------------------------ the feed
class MegamixFeed:
    """Connects a Hugging Face causal LM and a :class:`megamix.mixer.Mixer` for a training loop that
    megamix does not own (Trainer, Accelerate).

    Args:
        model: the model, or a DDP, DeepSpeed or Accelerate wrapper around it. If it was patched with
            ``apply_megamix(model, mixer)``, the fused path is used. Otherwise the capture hook is
            attached here.
        mixer: the Mixer, built with this process's data-parallel ``rank`` and ``world_size``.

    Per optimizer step: ``for inputs in feed.micro_batches(device): model(**inputs).loss ...``, then
    ``feed.step(step)``. ``feed.path`` is ``"fused"`` or ``"capture"``.
    """

    def __init__(self, model: nn.Module, mixer: Any):
        self.mixer = mixer
        self.model = unwrap(model)
        patch = patched(self.model)
        if patch is not None and patch.mixer is not mixer:
            raise ValueError("the model is patched with another Mixer; call apply_megamix(model, mixer) with this one")
        hook = None if patch is not None else attach(self.model, mixer, auto_step=False,
                                                     dp_world_size=mixer.world_size)
        #: the same head adapter as megamix's own loop; the patch stays the caller's (removed with unpatch)
        self.binding = HeadBinding(patch, hook, owns_patch=False)
        self._handles = [self.model.register_forward_pre_hook(self._bind, with_kwargs=True)]
        if hook is not None:
            self._handles.append(self.model.register_forward_hook(self._record_loss, with_kwargs=True))

    @property
    def path(self) -> str:
        return self.binding.path

    @property
    def n_micro(self) -> int:
        """Micro-batches per optimizer step on each rank (the gradient accumulation steps)."""
        return gradient_accumulation_steps(self.mixer.cfg, self.mixer.world_size)

    # ------------------------------------------------------------------ per micro-step
    def inputs(self, batch: Any, device: Any = None) -> dict:
        """Model keyword arguments for one loader batch.

        ``labels`` are the input ids (HF semantics, the model shifts them). ``shift_labels`` holds the
        loader's exact next tokens, including the window's last one, and HF losses and the fused head
        use it. ``position_ids`` restart at each document start. With ``use_cache=False`` (no KV cache
        in training), HF's masks then keep attention within each document, as in megamix's own loop.
        The batch itself travels under :data:`BATCH_KEY`. The model must accept these keyword arguments;
        every causal LM in transformers 5 does."""
        def dev(t: torch.Tensor) -> torch.Tensor:
            return t if device is None else t.to(device, non_blocking=True)

        ids = dev(batch.input_ids)
        return {"input_ids": ids, "position_ids": dev(batch.position_ids), "labels": ids,
                "shift_labels": dev(batch.labels), "use_cache": False, BATCH_KEY: batch}

    def micro_batches(self, device: Any = None) -> list[dict]:
        """The next optimizer step's micro-batches on this rank, as model keyword arguments."""
        return [self.inputs(b, device) for b in self.mixer.next_step()]

    def _bind(self, module: nn.Module, args: tuple, kwargs: dict):
        batch = kwargs.pop(BATCH_KEY, None)
        if batch is None:
            return None
        self.binding.bind(batch)
        return args, kwargs

    def _record_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Capture path: per-sample train losses for the strategy, from the logits the model returned."""
        labels, logits = kwargs.get("shift_labels"), getattr(output, "logits", None)
        if labels is None or logits is None or not torch.is_grad_enabled() or self.binding.hook.capture.context is None:
            return
        labels = labels.to(logits.device, non_blocking=True)
        tok = token_cross_entropy(logits.detach().flatten(0, 1), labels.flatten()).view(labels.shape)  # no fp32 copy
        self.binding.record_loss(tok, labels)

    # ------------------------------------------------------------------ per optimizer step
    def step(self, step: int) -> dict | None:
        """``Mixer.step(step)`` after optimizer step ``step`` (0-based). With ``mixing.eval_grad_batches > 0``
        it also passes the held-out gradient functions (model body, LM-head weight, gathered under ZeRO-3)."""
        cfg = self.mixer.cfg
        if cfg.mixing.eval_grad_batches > 0 and self.mixer.head.collecting:
            model = self.model
            return self.mixer.step(step, hidden_fn=lambda b: body_hidden_states(model, b),
                                   lm_head_weight=lambda: gathered_parameter(model.get_output_embeddings().weight))
        return self.mixer.step(step)

    def remove(self) -> None:
        """Remove the hooks this feed installed. A fused patch made by the caller stays in place."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.binding.remove()


def _check_rank(mixer: Any, rank: int, world_size: int, who: str, build_as: str) -> None:
    """One-line ConfigError unless the Mixer was built for this process's rank and world size."""
    if (world_size, rank) != (mixer.world_size, mixer.rank):
        raise ConfigError(f"the Mixer was built for rank {mixer.rank} of {mixer.world_size} but {who} is rank "
                          f"{rank} of {world_size}; build it as Mixer(cfg, store, {build_as})")


def check_accelerator(accelerator: Any, mixer: Any) -> None:
    """Raise a one-line ConfigError unless ``accelerator`` runs the Mixer's batch geometry (processes, rank,
    gradient accumulation steps)."""
    _check_rank(mixer, accelerator.process_index, accelerator.num_processes, "this process",
                "rank=accelerator.process_index, world_size=accelerator.num_processes")
    n = gradient_accumulation_steps(mixer.cfg, mixer.world_size)
    if accelerator.gradient_accumulation_steps != n:
        raise ConfigError(f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) but "
                          f"the megamix config has {n} micro-batches per rank and step; pass "
                          f"gradient_accumulation_steps={n}")


# ------------------------------------------------------------------------------------------ Trainer
def check_trainer_args(args: Any, mixer: Any, *, fused: bool = False, train_dataset: Any = None,
                       compute_loss_func: Any = None) -> None:
    """Raise a one-line ConfigError for Trainer settings that contradict megamix's batch geometry or stream."""
    t = mixer.cfg.train
    if train_dataset is not None:
        raise ConfigError("MegamixTrainer draws its training batches from the Mixer: drop train_dataset= "
                          "(an eval_dataset is fine)")
    if args.max_steps is None or args.max_steps <= 0:
        raise ConfigError(f"TrainingArguments.max_steps={args.max_steps}: megamix's sample stream has no epochs; "
                          f"set max_steps to the number of optimizer steps (e.g. train.steps={t.steps})")
    if args.per_device_train_batch_size != t.micro_batch_size:
        raise ConfigError(f"TrainingArguments.per_device_train_batch_size={args.per_device_train_batch_size} but the "
                          f"megamix config has train.micro_batch_size={t.micro_batch_size}; set "
                          f"per_device_train_batch_size={t.micro_batch_size}")
    _check_rank(mixer, args.process_index, args.world_size, "this Trainer process",
                "rank=args.process_index, world_size=args.world_size")
    n = gradient_accumulation_steps(mixer.cfg, mixer.world_size)
    if args.gradient_accumulation_steps != n:
        raise ConfigError(f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} but "
                          f"train.global_batch_size={t.global_batch_size} / (micro_batch_size {t.micro_batch_size} x "
                          f"{mixer.world_size} processes) = {n}; set gradient_accumulation_steps={n}")
    if getattr(args, "n_gpu", 1) > 1:
        raise ConfigError(f"TrainingArguments.n_gpu={args.n_gpu} (torch DataParallel) would split megamix's "
                          "micro-batches; launch one process per GPU (torchrun / accelerate launch) instead")
    if args.auto_find_batch_size:
        raise ConfigError("TrainingArguments.auto_find_batch_size=True would change the micro-batch size; set it "
                          "to False and choose train.micro_batch_size in the megamix config")
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy != "random":
        raise ConfigError(f"TrainingArguments.train_sampling_strategy={strategy!r} has no effect: megamix's loader "
                          "orders the samples (seed train.seed); leave it at the default 'random'")
    if fused and args.label_smoothing_factor:
        raise ConfigError(f"TrainingArguments.label_smoothing_factor={args.label_smoothing_factor} needs logits, which "
                          "megamix's fused head never builds; set it to 0, or use the capture path (no apply_megamix)")
    if fused and compute_loss_func is not None:
        raise ConfigError("compute_loss_func= needs logits, which megamix's fused head never builds; drop it, or use "
                          "the capture path (no apply_megamix)")


class MegamixCallback(TrainerCallback):
    """The Trainer events of online mixing, for a :class:`MegamixFeed`.

    - ``on_train_begin``: on resume (``state.global_step > 0``), restore the mixing state from the
      checkpoint folder being resumed (``resume_dir``, else ``<output_dir>/checkpoint-<global_step>``).
    - ``on_step_end``: ``feed.step(global_step - 1)`` (new weights every ``mixing.update_every`` steps).
    - ``on_save``: :func:`save_state` into ``<output_dir>/checkpoint-<global_step>``, on every rank.
    """

    def __init__(self, feed: MegamixFeed):
        self.feed = feed
        self.mixer = feed.mixer
        self.resume_dir: str | None = None
        self.last_update: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.feed.binding.patch is not None and model is not None:
            apply_megamix(model, self.mixer)  # idempotent; registers the head weight once ZeRO-3 has partitioned it
        if state.global_step > 0:
            folder = self.resume_dir or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            step = load_state(self.mixer, folder)
            if step != state.global_step or self.mixer.loader.step != state.global_step:
                raise ConfigError(f"{folder} holds the mixing state of step {step}, the Trainer resumes at step "
                                  f"{state.global_step}; resume from a checkpoint folder written by this run")
        elif self.mixer.loader.step != 0:
            raise ConfigError(f"the Mixer has already drawn {self.mixer.loader.step} steps but the Trainer starts at "
                              "step 0; build a new Mixer, or resume with train(resume_from_checkpoint=...)")

    def on_step_end(self, args, state, control, **kwargs):
        self.last_update = self.feed.step(state.global_step - 1)

    def on_save(self, args, state, control, **kwargs):
        save_state(self.mixer, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
                   state.global_step)


class _Placeholders(torch.utils.data.IterableDataset):
    """The Trainer's training "dataset": endless integers that nobody reads (see the module docstring)."""

    def __iter__(self):
        return itertools.count()


class MegamixTrainerMixin:
    """Makes a ``transformers.Trainer`` (or a subclass: ``class MyTrainer(MegamixTrainerMixin, SFTTrainer)``)
    train on megamix's stream. Takes ``mixer=`` on top of the Trainer's own arguments; no ``train_dataset``.

    Attributes: ``megamix`` (the :class:`MegamixFeed`), ``megamix_callback`` (the :class:`MegamixCallback`).
    Training logs gain the current domain weights as ``megamix/weight/<domain>``.
    """

    def __init__(self, *args, mixer: Any, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise ConfigError("MegamixTrainer needs model= (model_init is not supported: the Mixer's statistics "
                              "hooks are installed on the model when the Trainer is built)")
        check_trainer_args(self.args, mixer, fused=patched(unwrap(self.model)) is not None,
                           train_dataset=self.train_dataset, compute_loss_func=self.compute_loss_func)
        feed = MegamixFeed(self.model, mixer)
        self.megamix = feed
        self.megamix_callback = MegamixCallback(feed)
        self.add_callback(self.megamix_callback)

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(_Placeholders(), batch_size=None)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if num_batches != self.megamix.n_micro:
            raise RuntimeError(f"the Trainer asked for {num_batches} micro-batches in one optimizer step, megamix's "
                               f"step has {self.megamix.n_micro}")
        return self.megamix.micro_batches(), None  # None: each micro-batch's loss is its token mean, / accumulation

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        self.megamix_callback.resume_dir = folder if isinstance(folder, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:
            mixer = self.megamix.mixer
            logs = {**logs, **{f"megamix/weight/{d}": float(w) for d, w in zip(mixer.domains, mixer.weights)}}
        return super().log(logs, *args, **kwargs)


class MegamixTrainer(MegamixTrainerMixin, Trainer):
    """``transformers.Trainer`` on megamix's stream: ``MegamixTrainer(mixer=mixer, model=model, args=args, ...)``."""


__all__ = ["BATCH_KEY", "MegamixCallback", "MegamixFeed", "MegamixTrainer", "MegamixTrainerMixin", "check_accelerator",
           "check_trainer_args", "load_state", "save_state"]

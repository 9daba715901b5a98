"""Execution backends of the one training loop (:func:`megamix.train.loop.train`).

A backend owns what differs between plain PyTorch and an engine such as DeepSpeed: process-group
set-up, wrapping the model with its optimizer, backward / optimizer step, where the model state is
saved, how a parameter is gathered, and mixed precision. The loop owns everything else: data, the
LM-head loss, statistics, mixing updates, evaluation, metrics, checkpoint layout, the summary.

Backends: :class:`PlainBackend` (one process, ``torch.optim.AdamW``, CPU or one GPU) and
:class:`DeepSpeedBackend` (a DeepSpeed engine, ZeRO 0-3, any number of ranks; built from the glue in
:mod:`megamix.integrations.deepspeed`, which imports deepspeed inside its functions).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.integrations import deepspeed as ds_glue

MODEL_FILE = "model.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


class Backend:
    """What the loop needs from an execution backend. Subclasses override the hooks below.

    Attributes:
        name: recorded in ``result.json`` (``plain`` | ``deepspeed``).
        rank, world_size: data-parallel position of this process.
        module: what the loop calls for a forward (the model, or the engine wrapping it).
        model: the bare ``nn.Module`` (for evaluation, the LM head and state).
        device: where batches go.
    """

    name = "base"

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = int(rank), int(world_size)
        self.module: Any = None
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")

    # set-up ------------------------------------------------------------------------------------------
    def check(self, cfg: MegamixConfig) -> list[str]:
        """Validate the config for this backend (raise ConfigError); return notes to print."""
        return []

    def init(self, cfg: MegamixConfig) -> None:
        """Bring up communication (called before anything else touches torch.distributed)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float],
              cfg: MegamixConfig) -> None:
        """Take ownership of ``model`` and ``optimizer``; ``lr_at(step)`` is the learning rate of step
        ``step`` (0-based)."""
        raise NotImplementedError

    # per step ------------------------------------------------------------------------------------------
    def autocast(self):
        """Context for forwards (mixed precision), a no-op by default."""
        return contextlib.nullcontext()

    def before_step(self, step: int) -> None:
        """Called before the micro-batches of optimizer step ``step`` (0-based)."""

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        raise NotImplementedError

    def grads_finite(self) -> bool:
        """Whether the accumulated gradients are finite, checked before :meth:`optimizer_step` (the loop's
        non-finite guard). Default True: engines that check their own gradients (DeepSpeed's overflow check)
        keep it."""
        return True

    def optimizer_step(self, skip: bool = False) -> float:
        """Apply the accumulated gradients, or with ``skip`` drop them (no parameter or optimizer-state change);
        return the gradient norm (NaN if unknown)."""
        raise NotImplementedError

    def gathered(self, param: torch.Tensor):
        """Context yielding the full ``param`` (a ZeRO-3 gather on engines that partition it)."""
        return contextlib.nullcontext(param)

    # collectives ----------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any data-parallel rank (collective)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t.item())
        return bool(flag)

    def local_parameters(self):
        """The parameter tensors this rank holds (its shards, on engines that partition them)."""
        return [p.detach() for p in self.model.parameters()]

    def params_finite(self) -> bool:
        """Whether every parameter is finite on every rank (collective; checked before each checkpoint)."""
        ok = all(bool(torch.isfinite(p).all()) for p in self.local_parameters() if p.numel())
        return not self.any(not ok)

    def mean(self, x: float) -> float:
        """Mean of a Python float over the data-parallel ranks."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor([x], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            return float(t.item()) / self.world_size
        return x

    # state ----------------------------------------------------------------------------------------------
    def save(self, ckpt_root: Path, tag: str) -> None:
        """Write the model/optimizer state of checkpoint ``tag`` under ``ckpt_root / tag`` (collective)."""
        raise NotImplementedError

    def read(self, ckpt_root: Path, tag: str) -> Any:
        """Read checkpoint ``tag``'s model state into memory without applying it (so an unreadable file is
        found before anything is restored); None when the backend reads during :meth:`load`."""
        return None

    def load(self, ckpt_root: Path, tag: str, state: Any = None) -> None:
        """Restore checkpoint ``tag`` (``state``: what :meth:`read` returned)."""
        raise NotImplementedError

    def load_legacy(self, state: dict) -> None:
        """Restore model/optimizer from a v0.1 single-file checkpoint dict (plain backend only)."""
        raise ConfigError("this checkpoint was written by megamix 0.1's single-process trainer; resume it "
                          "with deepspeed.enabled=false or start a new train.out_dir")

    def close(self) -> None:
        """Release engine resources at the end of a run."""


class PlainBackend(Backend):
    """One process: AdamW on the model, gradient accumulation, optional bf16 autocast, CPU or one GPU."""

    name = "plain"

    def check(self, cfg: MegamixConfig) -> list[str]:
        if self.world_size > 1:
            raise ConfigError(f"world size {self.world_size} but deepspeed.enabled=false: the plain backend runs "
                              "one process (several would train full copies into one out_dir); set "
                              "deepspeed.enabled=true for multi-rank runs")
        resolve_device(cfg.train.device)
        return []

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        self.device = resolve_device(cfg.train.device)
        self.model = self.module = model.to(self.device)
        self.optimizer = optimizer
        self.lr_at = lr_at
        self.grad_clip = cfg.train.grad_clip
        self.dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else None
        self._norm: torch.Tensor | None = None

    def autocast(self):
        kind = self.device.type
        if self.dtype is None:
            return torch.autocast(kind, enabled=False)
        return torch.autocast(kind, dtype=self.dtype)

    def before_step(self, step: int) -> None:
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss, n_micro):
        (loss / n_micro).backward()

    def grads_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self._norm = torch.nn.utils.get_total_norm(grads) if grads else None
        return self._norm is None or bool(torch.isfinite(self._norm))

    def optimizer_step(self, skip: bool = False) -> float:
        norm, self._norm = self._norm, None   # from grads_finite() of this step, if it ran
        if not skip:
            if self.grad_clip > 0:
                if norm is None:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                else:  # the same clipping as clip_grad_norm_, with the norm already computed
                    torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else math.nan

    def save(self, ckpt_root, tag):
        path = Path(ckpt_root) / tag / MODEL_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}, tmp)
        tmp.replace(path)

    def read(self, ckpt_root, tag):
        path = Path(ckpt_root) / tag / MODEL_FILE
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # missing, truncated, garbled: name the file
            lines = str(e).strip().splitlines()
            raise OSError(f"{path} cannot be read ({type(e).__name__}: {lines[0][:160] if lines else ''})") from None

    def load(self, ckpt_root, tag, state=None):
        self.load_legacy(self.read(ckpt_root, tag) if state is None else state)

    def load_legacy(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine (ZeRO 0-3, fp32 or bf16, gradient accumulation), one process per rank.

    The optimizer and LR schedule are the loop's (passed to ``deepspeed.initialize`` as objects), the
    batch geometry and ZeRO settings come from :func:`megamix.integrations.deepspeed.build_ds_config`.
    Checkpoints: the engine's files in the checkpoint directory (``save_latest=False``; the loop
    writes ``latest``).

    The engine's step at the accumulation boundary runs in :meth:`optimizer_step`, after the loop's
    non-finite check: a skipped step still runs ``engine.step()`` (so the engine's counters and LR schedule
    stay aligned with the step index) but the wrapped torch optimizer, under every ZeRO stage, sees no
    gradients (:func:`megamix.integrations.deepspeed.skippable`), so parameters and optimizer state stay.
    """

    name = "deepspeed"

    def check(self, cfg: MegamixConfig) -> list[str]:
        return ds_glue.validate_launch(cfg, self.world_size)["notes"]

    def init(self, cfg: MegamixConfig) -> None:
        ds_glue.init_distributed(cfg.deepspeed.backend, rank=self.rank, world_size=self.world_size,
                                 skip_op_builds=cfg.deepspeed.skip_op_builds)

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        base = cfg.train.lr
        self._skip = ds_glue.skippable(optimizer)
        self.engine = ds_glue.create_engine(model, optimizer, lambda s: lr_at(s) / base,
                                            ds_glue.build_ds_config(cfg, self.world_size),
                                            skip_op_builds=cfg.deepspeed.skip_op_builds)
        self._bind(self.engine)

    def before_step(self, step: int) -> None:
        ds_glue.align_lr_schedule(self.engine, step)

    _skip = None

    def _bind(self, engine) -> None:
        self.engine = self.module = engine
        self.model = engine.module
        self.device = engine.device

    @classmethod
    def from_engine(cls, engine, rank: int, world_size: int) -> "DeepSpeedBackend":
        """Wrap an engine you created yourself (e.g. to use :class:`megamix.train.checkpoint.Checkpoints`
        in your own loop)."""
        b = cls(rank, world_size)
        b._bind(engine)
        return b

    def backward(self, loss, n_micro):
        # engine.backward scales by 1/gradient_accumulation_steps; engine.step applies the update at the
        # accumulation boundary only, which optimizer_step() runs.
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def optimizer_step(self, skip: bool = False) -> float:
        if skip and self._skip is None:
            raise RuntimeError("this DeepSpeedBackend cannot skip a step: build it with setup() (from_engine "
                               "wraps an optimizer megamix did not make skippable)")
        with self._skip(skip) if self._skip is not None else contextlib.nullcontext():
            self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def local_parameters(self):
        return [ds_glue.local_shard(p) for p in self.model.parameters()]

    def gathered(self, param):
        return ds_glue.gathered_parameter(param)

    def save(self, ckpt_root, tag):
        ds_glue.save_engine(self.engine, ckpt_root, tag)

    def load(self, ckpt_root, tag, state=None):
        ds_glue.load_engine(self.engine, ckpt_root, tag)


def make_backend(cfg: MegamixConfig, rank: int = 0, world_size: int = 1) -> Backend:
    """The backend ``cfg`` asks for: DeepSpeed when ``deepspeed.enabled``, else the plain one."""
    cls = DeepSpeedBackend if cfg.deepspeed.enabled else PlainBackend
    return cls(rank, world_size)


__all__ = ["Backend", "PlainBackend", "DeepSpeedBackend", "make_backend", "resolve_device", "MODEL_FILE"]

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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.data.corpus import atomic_write_json
from megamix.integrations import deepspeed as ds_glue
from megamix.train import optim
from megamix.train.model import check_attn_implementation, resolve_hf_config

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
    lr_at: Callable[[int], float] | None = None

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

    def current_lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (for the metrics)."""
        return float(self.lr_at(step)) if self.lr_at is not None else float("nan")

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> float:
        """Apply the accumulated gradients; return the gradient norm (NaN if unknown)."""
        raise NotImplementedError

    def gathered(self, param: torch.Tensor):
        """Context yielding the full ``param`` (a ZeRO-3 gather on engines that partition it)."""
        return contextlib.nullcontext(param)

    # collectives ----------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

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

    def load(self, ckpt_root: Path, tag: str) -> None:
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
        cuda = resolve_device(cfg.train.device).type == "cuda"
        check_attn_implementation(cfg.model.attn_implementation, cuda=cuda)
        optim.resolve_optimizer(cfg, cuda=cuda)
        return []

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        self.device = resolve_device(cfg.train.device)
        self.model = self.module = model.to(self.device)
        self.optimizer = optimizer
        self.lr_at = lr_at
        self.grad_clip = cfg.train.grad_clip
        self.dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else None

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

    def optimizer_step(self) -> float:
        gnorm = float("nan")
        if self.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm

    def save(self, ckpt_root, tag):
        path = Path(ckpt_root) / tag / MODEL_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}, tmp)
        tmp.replace(path)

    def load(self, ckpt_root, tag):
        state = torch.load(Path(ckpt_root) / tag / MODEL_FILE, map_location="cpu", weights_only=False)
        self.load_legacy(state)

    def load_legacy(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine (ZeRO 0-3, fp32 or bf16, gradient accumulation), one process per rank.

    The batch geometry, precision and ZeRO settings come from
    :func:`megamix.integrations.deepspeed.build_ds_config`, merged with the user's ``deepspeed.config``. The
    optimizer and LR schedule are the loop's (passed to ``deepspeed.initialize`` as objects) unless that file
    has an ``optimizer`` / ``scheduler`` section, which DeepSpeed then builds.
    Checkpoints: the engine's files in the checkpoint directory (``save_latest=False``; the loop
    writes ``latest``).
    """

    name = "deepspeed"
    user_schedule = False    # the ds_config's scheduler section drives the LR (not megamix's lr_at)
    _lr: float | None = None

    def check(self, cfg: MegamixConfig) -> list[str]:
        check_attn_implementation(cfg.model.attn_implementation)
        hidden = getattr(resolve_hf_config(cfg.model), "hidden_size", None)
        notes = ds_glue.validate_launch(cfg, self.world_size, hidden_size=hidden)
        optim.resolve_optimizer(cfg)
        return notes["notes"]

    def init(self, cfg: MegamixConfig) -> None:
        ds_glue.init_distributed(cfg.deepspeed.backend, rank=self.rank, world_size=self.world_size,
                                 skip_op_builds=cfg.deepspeed.skip_op_builds)

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        base = cfg.train.lr
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        ds_config = ds_glue.build_ds_config(cfg, self.world_size, hidden_size=hidden)
        self.lr_at = lr_at
        self.user_schedule = "scheduler" in ds_config
        params = optim.param_groups(model, cfg.train.weight_decay) if optimizer is None else None
        lr_lambda = None if self.user_schedule else (lambda s: lr_at(s) / base)
        self.engine = ds_glue.create_engine(model, optimizer, lr_lambda, ds_config, model_parameters=params,
                                            skip_op_builds=cfg.deepspeed.skip_op_builds)
        self._bind(self.engine)
        if self.rank == 0 and cfg.deepspeed.config:  # the merged config this run used, next to its config.yaml
            atomic_write_json(Path(cfg.train.out_dir) / "ds_config.json", ds_config)

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

    def before_step(self, step: int) -> None:
        self._lr = float(self.engine.get_lr()[0]) if self.user_schedule else None

    def current_lr(self, step: int) -> float:
        return self._lr if self.user_schedule and self._lr is not None else super().current_lr(step)

    def backward(self, loss, n_micro):
        # engine.backward scales by 1/gradient_accumulation_steps; engine.step applies the update at the
        # accumulation boundary only.
        self.engine.backward(loss)
        self.engine.step()

    def optimizer_step(self) -> float:
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def gathered(self, param):
        return ds_glue.gathered_parameter(param)

    def save(self, ckpt_root, tag):
        ds_glue.save_engine(self.engine, ckpt_root, tag)

    def load(self, ckpt_root, tag):
        ds_glue.load_engine(self.engine, ckpt_root, tag)


def make_backend(cfg: MegamixConfig, rank: int = 0, world_size: int = 1) -> Backend:
    """The backend ``cfg`` asks for: DeepSpeed when ``deepspeed.enabled``, else the plain one."""
    cls = DeepSpeedBackend if cfg.deepspeed.enabled else PlainBackend
    return cls(rank, world_size)


__all__ = ["Backend", "PlainBackend", "DeepSpeedBackend", "make_backend", "resolve_device", "MODEL_FILE"]

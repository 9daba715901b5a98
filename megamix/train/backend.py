"""Execution backends of the one training loop (:func:`megamix.train.loop.train`).

A backend owns what differs between plain PyTorch and an engine such as DeepSpeed: process-group
set-up, wrapping the model with its optimizer, backward / optimizer step, where the model state is
saved, how a parameter is gathered, and mixed precision. The loop owns everything else: data, the
LM-head loss, statistics, mixing updates, evaluation, metrics, checkpoint layout, the summary.

Backends: :class:`PlainBackend` (one process, ``torch.optim.AdamW``, CPU or one GPU),
:class:`DDPBackend` (torch ``DistributedDataParallel``, one process per rank, gloo on CPU / nccl on GPU)
and :class:`DeepSpeedBackend` (a DeepSpeed engine, ZeRO 0-3, any number of ranks; built from the glue in
:mod:`megamix.integrations.deepspeed`, which imports deepspeed inside its functions).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from megamix import comm
from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.integrations import deepspeed as ds_glue
from megamix.integrations import ds_universal
from megamix.io import atomic_path, atomic_write_json
from megamix.train import markers as mk, optim
from megamix.train.model import check_attn_implementation, resolve_hf_config

MODEL_FILE = "model.pt"


class StepReport(NamedTuple):
    """What the loop reads from the device once per optimizer step (:meth:`Backend.step_report`)."""

    loss: float                 # the step's mean training loss, averaged over the data-parallel ranks
    grads_finite: bool          # the gradients are finite on every rank (True when the backend checks its own)
    stop: bool                  # a stop was requested on some rank
    grad_norm: float | None     # the gradient norm before clipping (None when the backend computes none)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def read_model_file(path: Path, rank: int = 0, world_size: int = 1) -> dict:
    """``model.pt`` (a ``torch.save`` zip) for a resume, mapped (``torch.load(mmap=True)``), not copied: its pages
    are the page cache, one copy per node however many ranks read it; a rank's own memory gets only the copies the
    backend makes (parameters, optimizer state). A torn or corrupt file is still found before anything is restored:
    the zip directory is read (a truncated file has none) and the CRC-32 of this rank's share of the records checked
    (:func:`megamix.train.markers.share`: the ranks check disjoint shares covering the file, and the resume's
    collective decision makes one failure everyone's; a record without one, CRC 0, is not checked: torch.save
    computes them unless told not to). Raises OSError naming the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            for name in mk.share({n: i.file_size for n, i in infos.items()}, rank, world_size):
                if infos[name].CRC:
                    with zf.open(name) as f:      # verifies the CRC-32 at the end of the record
                        while f.read(1 << 20):
                            pass
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # missing, truncated, garbled: name the file
        lines = str(e).strip().splitlines()
        raise OSError(f"{path} cannot be read ({type(e).__name__}: {lines[0][:160] if lines else ''})") from None


class Backend:
    """What the loop needs from an execution backend. Subclasses override the hooks below.

    Attributes:
        name: recorded in ``result.json`` (``plain`` | ``ddp`` | ``deepspeed``).
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

    def grad_norm(self) -> torch.Tensor | None:
        """The accumulated gradients' total norm as a device scalar, computed before :meth:`optimizer_step` (which
        clips with it); the loop reads it, and from it the gradients' finiteness, in the step's one host read
        (:meth:`step_report`). None: the engine checks its own gradients (DeepSpeed's overflow check)."""
        return None

    def optimizer_step(self, skip: bool = False) -> float | torch.Tensor:
        """Apply the accumulated gradients, or with ``skip`` drop them (no parameter or optimizer-state change);
        return the gradient norm (NaN if unknown; a 0-d device tensor is read only when it is logged)."""
        raise NotImplementedError

    def gathered(self, param: torch.Tensor):
        """Context yielding the full ``param`` (a ZeRO-3 gather on engines that partition it)."""
        return contextlib.nullcontext(param)

    # collectives (through megamix.comm: device from the group's backend) ------------------------------------
    @property
    def group(self) -> Any:
        """The process group of this backend's ranks for :mod:`megamix.comm`: the default group when it runs several
        ranks, :data:`megamix.comm.LOCAL` (no communication) when it runs one."""
        return None if self.world_size > 1 else comm.LOCAL

    def barrier(self) -> None:
        if self.world_size > 1:
            comm.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any data-parallel rank (collective)."""
        if self.world_size > 1 and comm.size() > 1:
            t = torch.full((1,), 1 if flag else 0, dtype=torch.int32, device=comm.device_for(prefer=self.device))
            return bool(comm.all_reduce(t, "max").item())
        return bool(flag)

    def step_report(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, stop: bool) -> StepReport:
        """The one host read of an optimizer step, from one 4-value all-reduce on the device: the loss averaged over
        the data-parallel ranks, whether the gradients are finite on every rank, whether a stop was requested on any
        rank, and the gradient norm (None when the backend computes none). ``loss_sum`` is this rank's mean
        micro-step loss, a device scalar accumulated without host reads; ``grad_norm`` is :meth:`grad_norm`'s."""
        dev = loss_sum.device
        nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
        norm = nan if grad_norm is None else grad_norm.detach().reshape(()).to(dev, torch.float64)
        v = torch.stack([loss_sum.detach().reshape(()).to(torch.float64),
                         (~torch.isfinite(norm)).to(torch.float64) if grad_norm is not None else torch.zeros_like(nan),
                         torch.full((), 1.0 if stop else 0.0, dtype=torch.float64, device=dev), norm])
        world = self.world_size if (self.world_size > 1 and comm.size() > 1) else 1
        if world > 1:
            comm.all_reduce(v, "sum")
        loss, bad, stops, gnorm = v.tolist()
        return StepReport(loss / world, bad == 0, stops > 0, None if grad_norm is None else gnorm / world)

    def local_parameters(self):
        """The parameter tensors this rank holds (its shards, on engines that partition them)."""
        return [p.detach() for p in self.model.parameters()]

    def params_finite(self) -> bool:
        """Whether every parameter is finite on every rank (collective; checked before each checkpoint): one flag
        per device the parameters are on (a GPU, the CPU for offloaded shards), read once each."""
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for p in self.local_parameters():
            if p.numel():
                flags.setdefault(p.device, []).append(torch.isfinite(p).all())
        ok = all(bool(torch.stack(fs).all()) for fs in flags.values())
        return not self.any(not ok)

    def mean(self, x: float) -> float:
        """Mean of a Python float over the data-parallel ranks."""
        if self.world_size > 1 and comm.size() > 1:
            t = torch.full((1,), float(x), dtype=torch.float64, device=comm.device_for(prefer=self.device))
            return float(comm.all_reduce(t, "sum").item()) / self.world_size
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

    def close(self) -> None:
        """Release engine resources at the end of a run."""

    def progress_label(self, cfg: MegamixConfig) -> str:
        """Name of the progress bar / log lines."""
        return "train" if self.world_size == 1 and self.name == "plain" else f"train[{self.name} x{self.world_size}]"


class PlainBackend(Backend):
    """One process: AdamW on the model, gradient accumulation, optional bf16 autocast, CPU or one GPU."""

    name = "plain"

    def check(self, cfg: MegamixConfig) -> list[str]:
        if self.world_size > 1:
            raise ConfigError(f"world size {self.world_size}: the plain backend runs one process (several would "
                              "train full copies into one out_dir); use the DDP backend (megamix train picks it "
                              "under torchrun) or set deepspeed.enabled=true for multi-rank runs")
        self._check_model(cfg, cuda=resolve_device(cfg.train.device).type == "cuda")
        return []

    @staticmethod
    def _check_model(cfg: MegamixConfig, *, cuda: bool) -> None:
        """The attention implementation and optimizer can run on this device (one-line errors otherwise)."""
        check_attn_implementation(cfg.model.attn_implementation, cuda=cuda)
        optim.resolve_optimizer(cfg, cuda=cuda)

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

    def grad_norm(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self._norm = torch.nn.utils.get_total_norm(grads) if grads else None
        return self._norm

    def optimizer_step(self, skip: bool = False) -> float | torch.Tensor:
        norm, self._norm = self._norm, None   # from grad_norm() of this step, if it ran
        if not skip:
            if self.grad_clip > 0:
                if norm is None:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                else:  # the same clipping as clip_grad_norm_, with the norm already computed
                    torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach() if norm is not None else math.nan     # a device tensor: read only if it is logged

    def save(self, ckpt_root, tag):
        path = Path(ckpt_root) / tag / MODEL_FILE
        # the random states (CPU and this rank's GPU) are in each rank's side file (megamix.train.checkpoint)
        with atomic_path(path, tmp_suffix=".tmp") as tmp:   # a fixed name: tests/test_bad_inputs.py (_enospc)
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, tmp)

    def read(self, ckpt_root, tag):
        """``model.pt`` mapped, not copied (:func:`read_model_file`): this rank's share of its records checked."""
        return read_model_file(Path(ckpt_root) / tag / MODEL_FILE, self.rank, self.world_size)

    def load(self, ckpt_root, tag, state=None):
        state = self.read(ckpt_root, tag) if state is None else state
        self.model.load_state_dict(state["model"])      # copies into the parameters (on their device)
        self.optimizer.load_state_dict(state["optimizer"])
        # the optimizer keeps a CPU tensor it is given as it is, here a view of the mapped file: give it its own
        # copy (the file may be pruned later; on a GPU the state was already copied to the device)
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.device.type == "cpu":
                    st[k] = v.clone()

    def resize_note(self, ckpt_root, tag) -> str:
        """For the line a resume on another world size logs (:mod:`megamix.train.elastic`; this method marks the
        backend as able to): ``model.pt`` is not sharded, every rank loads all of it."""
        return f"every rank loads {MODEL_FILE} (the whole model and optimizer state, not sharded) as it is"


class DDPBackend(PlainBackend):
    """torch ``DistributedDataParallel``: one process per rank, each with a full model and AdamW.

    Process group: ``gloo`` on CPU; on CUDA (device ``cuda:<local_rank>``) ``nccl`` for CUDA tensors plus ``gloo``
    for CPU tensors (``cpu:gloo,cuda:nccl``), initialised here from
    the rank and world size the entry point passes (the rendezvous address comes from the launcher's
    ``MASTER_ADDR``/``MASTER_PORT`` through torch's ``env://`` init); an already initialised default group
    of the same rank/size is reused. The loader gives each rank its own slice of every global batch.

    Gradient accumulation: the micro-steps before the last one of an optimizer step run under
    ``no_sync()`` (their gradients accumulate locally), the last one all-reduces (averages) the sum, so
    an optimizer step sees the same gradient as a single process over the whole global batch. The
    context is entered in :meth:`before_step` and left after the backward of the second-to-last
    micro-step, so it covers those micro-steps' forwards too (DDP decides at forward time whether the
    next backward synchronises). Every parameter that gets a gradient is reduced, however the forward
    reads it: the fused LM-head patch reads the (tied) head weight by attribute inside the model's
    forward, and its gradient reaches DDP's reducer like any other.

    Checkpoints: ``model.pt`` (model + optimizer, identical on all ranks), the plain backend's file, written by rank 0
    only; either backend resumes the other's on any world size. Every rank maps it on resume (:func:`read_model_file`).
    """

    name = "ddp"

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int | None = None,
                 timeout_minutes: float = 30.0):
        super().__init__(rank, world_size)
        self.local_rank = local_rank
        self.timeout_minutes = timeout_minutes
        self._owns_group = False
        self._sync_off = contextlib.ExitStack()
        self._n_micro = 1
        self._micro = 0

    def _device(self, cfg: MegamixConfig) -> torch.device:
        dev = resolve_device(cfg.train.device)
        if dev.type != "cuda":
            return dev
        if dev.index is not None:
            return dev
        n = torch.cuda.device_count()
        local = self.local_rank if self.local_rank is not None else self.rank % max(n, 1)
        if local >= n:
            raise ConfigError(f"rank {self.rank} (local rank {local}) has no GPU: {n} visible on this node; "
                              "launch at most one process per GPU (torchrun --nproc_per_node) or use "
                              "train.device=cpu")
        return torch.device("cuda", local)

    def check(self, cfg: MegamixConfig) -> list[str]:
        t = cfg.train
        per_rank = t.micro_batch_size * self.world_size
        if t.global_batch_size % per_rank:
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size x world size ({t.micro_batch_size} x {self.world_size} = "
                              f"{per_rank}); e.g. train.global_batch_size={per_rank * max(1, t.global_batch_size // per_rank)}")
        dev = self._device(cfg)
        self._check_model(cfg, cuda=dev.type == "cuda")
        n_micro = t.global_batch_size // per_rank
        return [f"DDP over {self.world_size} rank(s), {'nccl' if dev.type == 'cuda' else 'gloo'} on {dev.type}; "
                f"{n_micro} accumulation micro-step(s) of {t.micro_batch_size} per rank"]

    def init(self, cfg: MegamixConfig) -> None:
        dist = torch.distributed
        self.device = self._device(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()}/"
                                   f"{dist.get_world_size()}, not {self.rank}/{self.world_size}")
            return
        # on GPUs the group has both: nccl for CUDA tensors (gradients, megamix's statistics on the GPU), gloo for
        # CPU tensors (megamix.comm puts each collective on a device the group serves)
        dist.init_process_group("cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo", rank=self.rank,
                                world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=self.timeout_minutes))
        self._owns_group = True

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device = self._device(cfg)
        super().setup(model, optimizer, lr_at, cfg)
        self.device = device
        self.model = model.to(device)
        self.module = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.world_size)

    def before_step(self, step: int) -> None:
        super().before_step(step)
        self._sync_off.close()
        self._micro = 0
        if self._n_micro > 1:
            self._sync_off.enter_context(self.module.no_sync())

    def backward(self, loss, n_micro):
        (loss / n_micro).backward()
        self._micro += 1
        if self._micro == n_micro - 1:
            self._sync_off.close()   # the last micro-step's forward and backward synchronise

    def optimizer_step(self, skip: bool = False) -> float:
        self._sync_off.close()
        return super().optimizer_step(skip)

    def save(self, ckpt_root, tag):
        if self.rank == 0:
            super().save(ckpt_root, tag)

    def close(self) -> None:
        self._sync_off.close()
        if self._owns_group:
            comm.shutdown()
        self._owns_group = False


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine (ZeRO 0-3, fp32 or bf16, gradient accumulation), one process per rank.

    The batch geometry, precision and ZeRO settings come from
    :func:`megamix.integrations.deepspeed.build_ds_config`, merged with the user's ``deepspeed.config``. The
    optimizer and LR schedule are the loop's (passed to ``deepspeed.initialize`` as objects) unless that file
    has an ``optimizer`` / ``scheduler`` section, which DeepSpeed then builds.
    Checkpoints: the engine's files in the checkpoint directory (``save_latest=False``; the loop
    writes ``latest``).

    The engine's step at the accumulation boundary runs in :meth:`optimizer_step`, after the loop's
    non-finite check: a skipped step still runs ``engine.step()`` (so the engine's counters and LR schedule
    stay aligned with the step index) but the wrapped torch optimizer, under every ZeRO stage, sees no
    gradients (:func:`megamix.integrations.deepspeed.skippable`), so parameters and optimizer state stay.
    """

    name = "deepspeed"
    user_schedule = False    # the ds_config's scheduler section drives the LR (not megamix's lr_at)
    _lr: float | None = None

    #: the merged DeepSpeed config, built once by :meth:`check` (what the dry run prints and the engine gets)
    ds_config: dict | None = None

    def check(self, cfg: MegamixConfig) -> list[str]:
        check_attn_implementation(cfg.model.attn_implementation)
        hidden = getattr(resolve_hf_config(cfg.model), "hidden_size", None)
        launch = ds_glue.validate_launch(cfg, self.world_size, hidden_size=hidden)
        optim.resolve_optimizer(cfg)
        self.ds_config = launch["ds_config"]
        return launch["notes"]

    def init(self, cfg: MegamixConfig) -> None:
        ds_glue.init_distributed(cfg.deepspeed.backend, rank=self.rank, world_size=self.world_size,
                                 skip_op_builds=cfg.deepspeed.skip_op_builds)

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        base = cfg.train.lr
        ds_config = self.ds_config
        if ds_config is None:   # setup without check (a caller's own engine set-up): build it here, the same way
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            ds_config = self.ds_config = ds_glue.build_ds_config(cfg, self.world_size, hidden_size=hidden)
        self.lr_at = lr_at
        self.user_schedule = "scheduler" in ds_config
        params = optim.param_groups(model, cfg.train.weight_decay) if optimizer is None else None
        lr_lambda = None if self.user_schedule else (lambda s: lr_at(s) / base)
        self.engine = ds_glue.create_engine(model, optimizer, lr_lambda, ds_config, model_parameters=params,
                                            skip_op_builds=cfg.deepspeed.skip_op_builds)
        # the torch optimizer under the engine (ours, or the one DeepSpeed built from the ds_config)
        self._skip = ds_glue.skippable(optimizer if optimizer is not None else self.engine.basic_optimizer)
        self._bind(self.engine)
        with comm.together("writing ds_config.json", self.group):
            if self.rank == 0 and cfg.deepspeed.config:  # the merged config this run used, next to its config.yaml
                atomic_write_json(Path(cfg.train.out_dir) / "ds_config.json", ds_config)

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

    def before_step(self, step: int) -> None:
        if not self.user_schedule:  # megamix's LambdaLR follows the step index, also over skipped steps
            ds_glue.align_lr_schedule(self.engine, step)
        self._lr = float(self.engine.get_lr()[0]) if self.user_schedule else None

    def current_lr(self, step: int) -> float:
        return self._lr if self.user_schedule and self._lr is not None else super().current_lr(step)

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

    def progress_label(self, cfg: MegamixConfig) -> str:
        return f"train[deepspeed z{cfg.deepspeed.zero_stage} x{self.world_size}]"

    def save(self, ckpt_root, tag):
        ds_glue.save_engine(self.engine, ckpt_root, tag)

    def resize_note(self, ckpt_root, tag) -> str:
        """How the engine state is restored on this run's different world size (for the line Checkpoints.load
        logs); its presence marks the backend as able to resume on one (:mod:`megamix.train.elastic`)."""
        return ds_universal.resize_note(Path(ckpt_root) / tag, self.world_size)

    def load(self, ckpt_root, tag, state=None):   # another world size: DeepSpeed's universal checkpoint
        ds_universal.load_engine_files(self.engine, Path(ckpt_root), tag, self.rank, self.world_size, self.group)


def make_backend(cfg: MegamixConfig, rank: int = 0, world_size: int = 1, local_rank: int | None = None) -> Backend:
    """The backend ``cfg`` and the launch ask for: DeepSpeed when ``deepspeed.enabled``; else DDP when
    ``world_size > 1`` (``local_rank`` picks the GPU; default ``rank % GPUs``); else the plain one."""
    if cfg.deepspeed.enabled:
        return DeepSpeedBackend(rank, world_size)
    if world_size > 1:
        return DDPBackend(rank, world_size, local_rank=local_rank)
    return PlainBackend(rank, world_size)


__all__ = ["Backend", "StepReport", "PlainBackend", "DDPBackend", "DeepSpeedBackend", "make_backend", "resolve_device",
           "MODEL_FILE", "read_model_file"]

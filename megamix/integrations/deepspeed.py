"""DeepSpeed glue: the ds_config, launch validation, process-group start, engine creation, ZeRO-3
parameter handling and engine checkpoint files. Only this module imports ``deepspeed`` (inside functions).

The training loop's DeepSpeed backend (:class:`megamix.train.backend.DeepSpeedBackend`) is built from
these pieces; so is the fused LM head's ZeRO-3 support (:func:`megamix.integrations.hf.apply_megamix`).
For your own DeepSpeed loop, see docs/integration.md.

Scaling convention of the statistics: ``g_i`` is sample ``i``'s contribution to the gradient that the
optimizer applies, i.e. it includes the loss normalisation, the ``1/gradient_accumulation_steps`` that
``engine.backward`` applies and the ``1/dp_world_size`` of DeepSpeed's gradient averaging. The summed
statistics of a round therefore equal those of a single-process run over the same global batches.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError


# ---------------------------------------------------------------------------------------- launch checks
def gradient_accumulation_steps(cfg: MegamixConfig, world_size: int) -> int:
    """``global_batch_size / (micro_batch_size * world_size)``; raises ConfigError if not an integer."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1 (got {world_size})")
    if t.global_batch_size % per_step != 0:
        ok = [m for m in range(1, t.global_batch_size + 1) if t.global_batch_size % (m * world_size) == 0]
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x world_size ({world_size}) = {per_step}. Valid micro_batch_size values "
            f"for this world size: {ok or 'none (change global_batch_size)'}")
    return t.global_batch_size // per_step


def build_ds_config(cfg: MegamixConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for this run (the optimizer and LR schedule are passed as objects)."""
    t, ds = cfg.train, cfg.deepspeed
    gas = gradient_accumulation_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": ds.backend == "nccl", "contiguous_gradients": True})
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    conf: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.dtype == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        conf["gradient_clipping"] = t.grad_clip
    return conf


def validate_launch(cfg: MegamixConfig, world_size: int, *, check_devices: bool = True) -> dict:
    """Check a DeepSpeed run config against the launch geometry without training.

    Checks: the config itself (``cfg.validate()``), batch divisibility (global = micro x world x gas),
    ZeRO settings, backend vs devices, dtype support, and that every rank gets at least one sample
    per micro-step. Raises :class:`ConfigError` with a fix; returns a summary dict
    (``world_size``, ``gradient_accumulation_steps``, ``ds_config``, ``notes``).
    """
    cfg.validate()
    ds, t = cfg.deepspeed, cfg.train
    if not ds.enabled:
        raise ConfigError("validate_launch is for DeepSpeed runs: set deepspeed.enabled=true")
    gas = gradient_accumulation_steps(cfg, world_size)
    notes: list[str] = []
    if check_devices and ds.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.backend=nccl needs CUDA GPUs, and none is visible; use "
                          "deepspeed.backend=gloo for CPU runs")
    if check_devices and ds.backend == "nccl" and torch.cuda.device_count() and world_size > 1:
        notes.append(f"{torch.cuda.device_count()} GPU(s) visible on this node")
    if ds.backend == "gloo" and torch.cuda.is_available():
        notes.append("gloo on a GPU machine is slow for large models; nccl is the usual choice")
    if ds.zero_stage >= 1 and world_size == 1:
        notes.append(f"ZeRO-{ds.zero_stage} with a single rank partitions nothing (works, no memory saving)")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if ds.offload_optimizer and not torch.cuda.is_available():
        notes.append("offload_optimizer on CPU JIT-builds DeepSpeed's cpu_adam op (about a minute, once)")
    if t.dtype == "bf16" and check_devices and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.dtype=bf16 but this GPU has no bf16 support; use train.dtype=fp32")
    if cfg.mixing.strategy != "static" and cfg.mixing.update_every > t.steps:
        notes.append(f"mixing.update_every ({cfg.mixing.update_every}) > train.steps ({t.steps}): "
                     "the strategy never runs")
    if t.checkpoint_every and t.checkpoint_every % cfg.mixing.update_every != 0:
        notes.append("checkpoint_every is not a multiple of mixing.update_every: checkpoints fall inside a "
                     "round; each rank's accumulators are saved in its side file so resume stays exact, "
                     "but the world size must then stay the same")
    return {"world_size": world_size, "gradient_accumulation_steps": gas,
            "ds_config": build_ds_config(cfg, world_size), "notes": notes}


# ---------------------------------------------------------------------------------------- distributed
def patch_cpu_op_builds() -> None:
    """Stop DeepSpeed from JIT-building its shared-memory all-reduce op (about 45 s on CPU).

    ``import deepspeed.comm.torch as m`` would return the real ``torch`` (name shadowing inside
    deepspeed.comm), so the module is fetched with importlib.
    """
    mod = importlib.import_module("deepspeed.comm.torch")
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


def init_distributed(backend: str = "gloo", *, rank: int, world_size: int, skip_op_builds: bool = True,
                     timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed through DeepSpeed (no-op if already initialised).

    The rendezvous address comes from the launcher (``MASTER_ADDR``/``MASTER_PORT``, read by torch's
    ``env://`` init); rank and world size are passed explicitly.
    """
    import datetime

    import deepspeed

    if skip_op_builds:
        patch_cpu_op_builds()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != world_size or torch.distributed.get_rank() != rank:
            raise RuntimeError(f"torch.distributed is already initialised as rank {torch.distributed.get_rank()}"
                               f"/{torch.distributed.get_world_size()}, not {rank}/{world_size}")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank,
                               world_size=world_size, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))


def create_engine(model: nn.Module, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float],
                  ds_config: dict, *, skip_op_builds: bool = True):
    """``deepspeed.initialize`` with an optimizer object (torch's AdamW avoids DeepSpeed's fused_adam
    build) and a ``LambdaLR`` schedule whose multiplier at step ``s`` is ``lr_lambda(s)``. Returns the engine."""
    import deepspeed

    if skip_op_builds:
        patch_cpu_op_builds()

    def make_sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_sched,
                                           config=ds_config)
    return engine


def skippable(optimizer: torch.optim.Optimizer) -> Callable[[bool], Any]:
    """Make the torch ``optimizer`` an engine wraps skippable; returns ``skip(flag)``, a context manager.

    Inside ``with skip(True): engine.step()`` the optimizer's step sees no gradients (a step pre-hook drops
    them), so it changes neither a parameter nor its state; the engine around it (ZeRO's partition copies,
    zeroing gradients, its counters) runs as usual. Under every ZeRO stage the engine calls this optimizer's
    ``step()`` on the (partitioned) fp32 parameters, so one hook covers them all."""
    state = {"skip": False}

    def drop_grads(opt, args, kwargs):
        if state["skip"]:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    optimizer.register_step_pre_hook(drop_grads)

    @contextlib.contextmanager
    def skip(flag: bool):
        state["skip"] = bool(flag)
        try:
            yield
        finally:
            state["skip"] = False

    return skip


def align_lr_schedule(engine, step: int) -> None:
    """Put the engine's ``LambdaLR`` at step ``step`` if it lags: DeepSpeed does not advance the schedule on a
    step its overflow check skipped, while megamix's schedule follows the step index."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "last_epoch") or sched.last_epoch == step:
        return
    sched.last_epoch = step - 1
    sched.step()


# ---------------------------------------------------------------------------------------- ZeRO-3 parameters
def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 manages (partitioned between its modules' forwards)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def register_external(module: nn.Module, param: torch.nn.Parameter) -> None:
    """``deepspeed.zero.register_external_parameter``: gather ``param`` for ``module``'s forward (and
    backward) although ``param`` belongs to another module. No-op for a parameter ZeRO-3 does not manage."""
    if not is_zero3_param(param):
        return
    import deepspeed

    deepspeed.zero.register_external_parameter(module, param)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this rank holds: its ZeRO-3 partition (``ds_tensor``), else the tensor itself."""
    return param.ds_tensor.detach() if is_zero3_param(param) else param.detach()


@contextlib.contextmanager
def gathered_parameter(param: torch.Tensor):
    """Yield the full ``param``: gathered (and re-partitioned on exit) under ZeRO-3, else as is. Every rank
    must enter it (the gather is collective)."""
    if not is_zero3_param(param):
        yield param
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield param


# ---------------------------------------------------------------------------------------- engine checkpoints
def save_engine(engine, ckpt_root: str | Path, tag: str) -> None:
    """The engine's own checkpoint files under ``ckpt_root/tag`` (collective). ``latest`` is NOT written
    here: the caller writes it once every rank's files are complete (megamix.train.checkpoint)."""
    engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False)


def load_engine(engine, ckpt_root: str | Path, tag: str) -> None:
    """Load the engine's files of checkpoint ``ckpt_root/tag`` (the tag is always explicit: DeepSpeed's own
    ``latest`` is not used). The caller has checked that the checkpoint is complete (megamix.train.checkpoint)."""
    where = Path(ckpt_root) / tag
    try:
        path, _ = engine.load_checkpoint(str(ckpt_root), tag=tag)
    except Exception as e:
        path, why = None, f" ({type(e).__name__}: {str(e).strip()[:160]})"
    else:
        why = ""
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {where}{why}; its files are all there, so they are "
                          f"damaged or were written by an incompatible engine: move {where} aside to resume from the "
                          "previous checkpoint, or start a new train.out_dir")


__all__ = ["gradient_accumulation_steps", "build_ds_config", "validate_launch", "patch_cpu_op_builds",
           "init_distributed", "create_engine", "skippable", "align_lr_schedule", "is_zero3_param",
           "register_external", "local_shard", "gathered_parameter", "save_engine", "load_engine"]



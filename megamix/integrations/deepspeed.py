"""DeepSpeed glue: the ds_config, launch validation, process-group start, engine creation, ZeRO-3
parameter handling and engine checkpoint files. Only this module and its universal-checkpoint part
(:mod:`megamix.integrations.ds_universal`, resuming on another world size, builds on this one) import ``deepspeed``
(inside functions).

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
import copy
import importlib
import json
import math
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


# ---------------------------------------------------------------------------------------- the ds_config
AUTO = "auto"
_MISSING = object()

#: DeepSpeed LR schedulers whose parameters mean the same as megamix fields: key -> (field, value of cfg).
_SCHEDULER_FIELDS: dict[str, dict[str, tuple[str, Callable[[MegamixConfig], Any]]]] = {
    "WarmupLR": {"warmup_max_lr": ("train.lr", lambda c: c.train.lr),
                 "warmup_num_steps": ("train.warmup_steps", lambda c: c.train.warmup_steps)},
    "WarmupDecayLR": {"warmup_max_lr": ("train.lr", lambda c: c.train.lr),
                      "warmup_num_steps": ("train.warmup_steps", lambda c: c.train.warmup_steps),
                      "total_num_steps": ("train.steps", lambda c: c.train.steps)},
    "WarmupCosineLR": {"warmup_num_steps": ("train.warmup_steps", lambda c: c.train.warmup_steps),
                       "total_num_steps": ("train.steps", lambda c: c.train.steps),
                       "cos_min_ratio": ("train.min_lr_ratio", lambda c: c.train.min_lr_ratio)},
}
#: "auto" values megamix fills although it has no field for them (DeepSpeed's defaults, megamix's linear warm-up).
_SCHEDULER_AUTO_DEFAULTS = {"warmup_min_lr": 0.0, "warmup_min_ratio": 0.0, "warmup_type": "linear"}
#: megamix's AdamW hyper-parameters that have no config field.
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def load_user_ds_config(path: str | Path) -> dict:
    """The user's DeepSpeed JSON (``deepspeed.config``); one-line ConfigError for a missing or invalid file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"deepspeed.config={path}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config={path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config={path}: the top level must be a JSON object")
    return data


def user_ds_config(cfg: MegamixConfig) -> dict:
    """The user's ds_config of ``cfg`` (``{}`` when ``deepspeed.config`` is empty)."""
    return load_user_ds_config(cfg.deepspeed.config) if cfg.deepspeed.config else {}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _Merge:
    """The user's ds_config plus megamix's settings: ``require`` (must agree: filled when missing or "auto",
    a conflict otherwise), ``default`` (filled when missing or "auto"; the user's value wins)."""

    def __init__(self, user: dict, source: str):
        self.conf = copy.deepcopy(user)
        self.source = source
        self.conflicts: list[str] = []
        self.notes: list[str] = []

    def get(self, path: tuple[str, ...]) -> Any:
        node: Any = self.conf
        for k in path:
            if not isinstance(node, dict) or k not in node:
                return _MISSING
            node = node[k]
        return node

    def set(self, path: tuple[str, ...], value: Any) -> None:
        node = self.conf
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[path[-1]] = value

    def require(self, path: tuple[str, ...], value: Any, field: str, fix: str | None = None,
                only_if_present: bool = False, shown: str | None = None) -> None:
        cur = self.get(path)
        if cur is _MISSING and only_if_present:
            return
        if cur is _MISSING or cur == AUTO:
            self.set(path, value)
        elif not _same(cur, value):
            key = ".".join(path)
            fix = fix or (f"set {field}={_fmt(cur)} in the megamix config, or set {key} to {_fmt(value)} or \"auto\" "
                          f"in {self.source}")
            self.conflicts.append(f"{key}={_fmt(cur)} in {self.source} vs {shown or f'{field}={_fmt(value)}'}: {fix}")

    def default(self, path: tuple[str, ...], value: Any) -> None:
        cur = self.get(path)
        if cur is _MISSING or cur == AUTO:
            self.set(path, value)

    def leftover_autos(self) -> list[str]:
        out = []

        def walk(node, prefix):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, prefix + (k,))
            elif node == AUTO:
                out.append(".".join(prefix))
        walk(self.conf, ())
        return out


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (bool, str, list, tuple)) or v is None else repr(v)


def merge_ds_config(cfg: MegamixConfig, world_size: int, user: dict | None = None, *, source: str = "ds_config",
                    hidden_size: int | None = None) -> tuple[dict, list[str]]:
    """The DeepSpeed config of this run: the user's ``user`` dict (from ``deepspeed.config``) merged with what
    megamix must set. Returns ``(ds_config, notes)``; raises ConfigError listing every conflict, one per line.

    megamix sets: ``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``
    (batch geometry), ``bf16.enabled`` (``train.dtype``; ``fp16``/``amp`` must be off), ``zero_optimization.stage``
    (``deepspeed.zero_stage``), ``gradient_clipping`` (``train.grad_clip``), and with an ``optimizer`` section its
    ``lr``/``weight_decay`` (``train.lr``/``train.weight_decay``), with a ``scheduler`` section the parameters
    that mean a megamix field (warm-up steps, total steps, peak LR, final LR ratio). A user value that differs
    is a conflict; "auto" is filled (also the ZeRO bucket sizes from ``hidden_size``); an "auto" megamix has no
    value for is an error. Everything else in the file is kept as it is. The optimizer and LR schedule are not
    written: without a section of their own, megamix passes its optimizer and schedule to
    ``deepspeed.initialize`` as objects."""
    t = cfg.train
    m = _Merge(user or {}, source)
    _merge_batch(m, cfg, world_size)
    _merge_precision(m, t.dtype)
    _merge_zero(m, cfg.deepspeed, hidden_size)
    # gradient clipping
    m.require(("gradient_clipping",), float(t.grad_clip), "train.grad_clip", only_if_present=t.grad_clip <= 0)
    if "optimizer" in m.conf:
        _merge_optimizer(m, t)
    if "scheduler" in m.conf:
        _merge_scheduler(m, cfg)
    m.default(("zero_allow_untested_optimizer",), True)
    m.default(("steps_per_print",), 10 ** 9)
    m.default(("wall_clock_breakdown",), False)
    for key in m.leftover_autos():
        m.conflicts.append(_unfilled_auto(key, source, hidden_size))
    if m.conflicts:
        raise ConfigError(f"deepspeed.config {source} conflicts with the megamix config ({len(m.conflicts)}):\n  - "
                          + "\n  - ".join(m.conflicts))
    return m.conf, m.notes


def _unfilled_auto(key: str, source: str, hidden_size: int | None) -> str:
    """The one line for an "auto" megamix cannot fill: the key, and what to write instead."""
    if key.split(".")[-1] in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                              "stage3_param_persistence_threshold") and not hidden_size:
        return (f'{key}="auto" in {source}: megamix fills it from the model\'s hidden size, which is not known here; '
                f"set it to a number in {source} (e.g. hidden_size x hidden_size)")
    return (f'{key}="auto" in {source}: megamix has no value to fill in for this key; set it to a value in {source}, '
            "or remove it to use DeepSpeed's default")


def _merge_batch(m: _Merge, cfg: MegamixConfig, world_size: int) -> None:
    """The batch geometry: global and micro batch sizes, and the accumulation steps they imply."""
    t = cfg.train
    gas = gradient_accumulation_steps(cfg, world_size)
    m.require(("train_batch_size",), t.global_batch_size, "train.global_batch_size")
    m.require(("train_micro_batch_size_per_gpu",), t.micro_batch_size, "train.micro_batch_size")
    m.require(("gradient_accumulation_steps",), gas, "train.global_batch_size",
              shown=f"train.global_batch_size / (train.micro_batch_size x world size {world_size}) = {gas}",
              fix=f"megamix derives it from train.global_batch_size and train.micro_batch_size; remove it from "
                  f"{m.source} or set it to \"auto\"")


def _merge_precision(m: _Merge, dtype: str) -> None:
    """Precision: megamix trains in fp32 or bf16 (``train.dtype``); fp16 and amp must stay off."""
    source = m.source
    bf16 = "bfloat16" if "bfloat16" in m.conf and "bf16" not in m.conf else "bf16"
    on = dtype == "bf16"
    m.require((bf16, "enabled"), on, "train.dtype", shown=f"train.dtype={dtype}",
              fix=(f"set train.dtype=bf16, or {bf16}.enabled to true or \"auto\" in {source}" if on else
                   f"set train.dtype=bf16 in the megamix config, or {bf16}.enabled to false or \"auto\" in {source}"))
    for sec in ("fp16", "amp"):
        m.require((sec, "enabled"), False, "train.dtype", only_if_present=True, shown=f"train.dtype={dtype}",
                  fix=f"megamix trains in fp32 or bf16 (train.dtype); set {sec}.enabled to false in {source} "
                      "and use train.dtype=bf16 for mixed precision")
    for node in (m.conf.get(sec) for sec in (bf16, "fp16", "amp")):  # "auto" in a section that is off sets nothing
        if isinstance(node, dict) and node.get("enabled") is False:  # (e.g. HF's amp.opt_level): DeepSpeed's default
            for key in [k for k, v in node.items() if v == AUTO]:
                del node[key]


def _merge_zero(m: _Merge, ds, hidden_size: int | None) -> None:
    """ZeRO: the stage, its defaults, optimizer offload, and the "auto" bucket sizes from ``hidden_size``."""
    m.require(("zero_optimization", "stage"), ds.zero_stage, "deepspeed.zero_stage")
    if ds.zero_stage >= 1:
        m.default(("zero_optimization", "overlap_comm"), ds.backend == "nccl")
        m.default(("zero_optimization", "contiguous_gradients"), True)
    if ds.zero_stage == 3 or m.get(("zero_optimization", "stage3_gather_16bit_weights_on_model_save")) == AUTO:
        m.default(("zero_optimization", "stage3_gather_16bit_weights_on_model_save"), False)
    off = ("zero_optimization", "offload_optimizer")
    if ds.offload_optimizer:
        m.require(off + ("device",), "cpu", "deepspeed.offload_optimizer", shown="deepspeed.offload_optimizer=true",
                  fix=f"set deepspeed.offload_optimizer=false to keep the offload_optimizer section of {m.source}")
        m.default(off + ("pin_memory",), torch.cuda.is_available())
    elif m.get(off + ("device",)) not in (_MISSING, "none", None):
        m.notes.append(f"ZeRO-Offload of the optimizer states to {m.get(off + ('device',))} comes from {m.source}")
    if hidden_size:  # "auto" ZeRO bucket sizes, from the hidden size as the Hugging Face integration fills them
        h = int(hidden_size)
        for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                           ("stage3_param_persistence_threshold", 10 * h)):
            if m.get(("zero_optimization", key)) == AUTO:
                m.set(("zero_optimization", key), value)


def _merge_optimizer(m: _Merge, t) -> None:
    """The user's ``optimizer`` section: DeepSpeed builds the optimizer, with megamix's LR and weight decay."""
    source = m.source
    typ = m.get(("optimizer", "type"))
    if t.optimizer != "auto":
        m.conflicts.append(f"optimizer (type {_fmt(typ)}) in {source} vs train.optimizer={t.optimizer}: DeepSpeed "
                           f"builds the optimizer from the file; set train.optimizer=auto, or remove the "
                           f"optimizer section from {source}")
    p = ("optimizer", "params")
    m.require(p + ("lr",), t.lr, "train.lr")
    m.require(p + ("weight_decay",), t.weight_decay, "train.weight_decay")
    m.default(p + ("betas",), list(ADAM_BETAS))
    m.default(p + ("eps",), ADAM_EPS)
    m.notes.append(f"optimizer: {typ} from {source}, built by DeepSpeed")


def _merge_scheduler(m: _Merge, cfg: MegamixConfig) -> None:
    """The user's ``scheduler`` section: it replaces megamix's warm-up + cosine; the parameters that mean a
    megamix field must agree with it."""
    source = m.source
    typ = m.get(("scheduler", "type"))
    fields = _SCHEDULER_FIELDS.get(typ, {})
    p = ("scheduler", "params")
    for key, (field, value) in fields.items():
        m.require(p + (key,), value(cfg), field)
    for key, value in _SCHEDULER_AUTO_DEFAULTS.items():
        if m.get(p + (key,)) == AUTO:
            m.set(p + (key,), value)
    if "warmup_num_steps" in fields and m.get(p + ("warmup_num_steps",)) == 0:
        m.conflicts.append(f"scheduler.params.warmup_num_steps=0 in {source}: DeepSpeed's {typ} needs at least 1 "
                           "warm-up step; set train.warmup_steps >= 1")
    unused = [f for f in ("train.warmup_steps", "train.min_lr_ratio", "train.steps")
              if f not in {v[0] for v in fields.values()}]
    m.notes.append(f"LR schedule: {typ} from {source} (megamix's linear warm-up + cosine decay is not used"
                   + (f"; {', '.join(unused)} do not apply to it)" if unused else ")"))


def ds_config_and_notes(cfg: MegamixConfig, world_size: int, *, hidden_size: int | None = None
                        ) -> tuple[dict, list[str]]:
    """:func:`merge_ds_config` of ``deepspeed.config`` (or of nothing, when it is empty)."""
    return merge_ds_config(cfg, world_size, user_ds_config(cfg), source=cfg.deepspeed.config or "ds_config",
                           hidden_size=hidden_size)


def build_ds_config(cfg: MegamixConfig, world_size: int, *, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON config for this run (see :func:`merge_ds_config`)."""
    return ds_config_and_notes(cfg, world_size, hidden_size=hidden_size)[0]


def offloads_optimizer(ds_config: dict) -> bool:
    """True when ``ds_config`` offloads the optimizer states (ZeRO-Offload to cpu or nvme)."""
    dev = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    return dev in ("cpu", "nvme")


def validate_launch(cfg: MegamixConfig, world_size: int, *, check_devices: bool = True,
                    hidden_size: int | None = None) -> dict:
    """Check a DeepSpeed run config against the launch geometry without training.

    Checks: the config itself (``cfg.validate()``), batch divisibility (global = micro x world x gas),
    ZeRO settings, backend vs devices, dtype support, that every rank gets at least one sample
    per micro-step, and the merge with the user's ``deepspeed.config`` (every conflict reported). Raises :class:`ConfigError` with a fix; returns a summary dict
    (``world_size``, ``gradient_accumulation_steps``, ``ds_config``, ``notes``).
    """
    cfg.validate()
    ds, t = cfg.deepspeed, cfg.train
    if not ds.enabled:
        raise ConfigError("validate_launch is for DeepSpeed runs: set deepspeed.enabled=true")
    gas = gradient_accumulation_steps(cfg, world_size)
    ds_config, notes = ds_config_and_notes(cfg, world_size, hidden_size=hidden_size)
    if check_devices and ds.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.backend=nccl needs CUDA GPUs, and none is visible; use "
                          "deepspeed.backend=gloo for CPU runs")
    if check_devices and ds.backend == "nccl" and torch.cuda.device_count() and world_size > 1:
        notes.append(f"{torch.cuda.device_count()} GPU(s) visible on this node")
    if ds.backend == "gloo" and torch.cuda.is_available():
        notes.append("gloo on a GPU machine is slow for large models; nccl is the usual choice")
    if ds.zero_stage >= 1 and world_size == 1:
        notes.append(f"ZeRO-{ds.zero_stage} with a single rank partitions nothing (works, no memory saving)")
    if offloads_optimizer(ds_config) and ds.zero_stage == 0:
        raise ConfigError("optimizer offload (deepspeed.offload_optimizer or zero_optimization.offload_optimizer in "
                          "deepspeed.config) needs deepspeed.zero_stage >= 1")
    if offloads_optimizer(ds_config) and not torch.cuda.is_available():
        notes.append("offload_optimizer on CPU JIT-builds DeepSpeed's cpu_adam op (about a minute, once)")
    if t.dtype == "bf16" and check_devices and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.dtype=bf16 but this GPU has no bf16 support; use train.dtype=fp32")
    if cfg.mixing.strategy != "static" and cfg.mixing.update_every > t.steps:
        notes.append(f"mixing.update_every ({cfg.mixing.update_every}) > train.steps ({t.steps}): "
                     "the strategy never runs")
    if t.checkpoint_every and t.checkpoint_every % cfg.mixing.update_every != 0:
        notes.append("checkpoint_every is not a multiple of mixing.update_every: checkpoints fall inside a "
                     "round; each rank's accumulators are saved in its side file so resume stays exact (on another "
                     "world size they are merged onto rank 0)")
    return {"world_size": world_size, "gradient_accumulation_steps": gas, "ds_config": ds_config, "notes": notes}


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


def create_engine(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  lr_lambda: Callable[[int], float] | None, ds_config: dict, *, model_parameters: Any = None,
                  skip_op_builds: bool = True):
    """``deepspeed.initialize``; returns the engine.

    ``optimizer``: an optimizer object (torch's AdamW avoids DeepSpeed's fused_adam build), or None when
    ``ds_config`` has an ``optimizer`` section, which DeepSpeed builds over ``model_parameters`` (param groups).
    ``lr_lambda``: a ``LambdaLR`` schedule whose multiplier at step ``s`` is ``lr_lambda(s)``, or None when
    ``ds_config`` has a ``scheduler`` section."""
    import deepspeed

    if skip_op_builds:
        patch_cpu_op_builds()
    kw: dict[str, Any] = {}
    if optimizer is not None:
        kw["optimizer"] = optimizer
    else:
        kw["model_parameters"] = model_parameters if model_parameters is not None else model.parameters()
    if lr_lambda is not None:
        kw["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, **kw)
    return engine


def fused_adam(params: Any, **kw) -> torch.optim.Optimizer:
    """DeepSpeed's ``FusedAdam`` (``deepspeed.ops.adam``; a CUDA kernel, JIT-built on first use unless prebuilt)."""
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, adam_w_mode=True, **kw)


def cpu_adam(params: Any, **kw) -> torch.optim.Optimizer:
    """DeepSpeed's ``DeepSpeedCPUAdam``, the optimizer ZeRO-Offload runs (JIT-builds the cpu_adam op once)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)


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


def engine_load(engine, load_dir: Path, load_tag: str, *, universal: bool = False) -> tuple[str | None, str]:
    """``engine.load_checkpoint(load_dir, tag=load_tag)`` (the tag is always explicit: DeepSpeed's own ``latest`` is
    not used), with DeepSpeed's universal loading path switched on for this load only when ``universal``. Returns
    (the path loaded, or None, and why not)."""
    conf = engine._config
    before = conf.load_universal_checkpoint
    conf.load_universal_checkpoint = bool(universal)
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag)
    except Exception as e:
        return None, f" ({type(e).__name__}: {str(e).strip()[:160]})"
    finally:
        conf.load_universal_checkpoint = before
    return path, ""


def load_engine(engine, ckpt_root: str | Path, tag: str) -> None:
    """Load the engine's files of checkpoint ``ckpt_root/tag``. The caller has checked that the checkpoint is
    complete (megamix.train.checkpoint). On another number of ranks:
    :func:`megamix.integrations.ds_universal.load_engine_files`."""
    where = Path(ckpt_root) / tag
    path, why = engine_load(engine, Path(ckpt_root), tag)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {where}{why}; its files are all there, so they are "
                          f"damaged or were written by an incompatible engine: move {where} aside to resume from the "
                          "previous checkpoint, or start a new train.out_dir")


__all__ = ["gradient_accumulation_steps", "load_user_ds_config", "user_ds_config", "merge_ds_config",
           "ds_config_and_notes", "build_ds_config", "offloads_optimizer", "validate_launch", "patch_cpu_op_builds",
           "init_distributed", "create_engine", "fused_adam", "cpu_adam", "skippable", "align_lr_schedule",
           "is_zero3_param", "register_external", "local_shard", "gathered_parameter", "save_engine", "load_engine",
           "engine_load"]



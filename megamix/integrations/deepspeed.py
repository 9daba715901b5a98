"""DeepSpeed integration: online data mixing inside a multi-rank DeepSpeed pretraining run.

This is the only megamix module that imports ``deepspeed``, and it does so inside functions.

Pieces:
- :func:`validate_launch` checks a run config against the launch geometry (``megamix train --dry-run``).
- :func:`build_ds_config` turns a :class:`~megamix.config.MegamixConfig` into a DeepSpeed config dict.
- :func:`init_distributed` / :func:`patch_cpu_op_builds` bring up torch.distributed through DeepSpeed,
  skipping the run-time C++ op builds that are useless on CPU.
- :func:`create_engine` wraps a model with the trainer's AdamW and LR schedule.
- :func:`attach` hooks a :class:`~megamix.mixer.Mixer` to an existing engine (or plain model): the
  generic LM-head gradient capture feeds ``mixer.stats`` on every micro-step, and after each optimizer
  step ``mixer.step`` all-reduces the statistics over data-parallel ranks every K steps, runs the
  strategy and pushes the new weights to the loader, identically on every rank.
- :func:`save_checkpoint` / :func:`load_checkpoint` keep the mixer state (loader, strategy,
  accumulators, projection seed) next to the DeepSpeed checkpoint, one side file per rank.
- :func:`run_deepspeed_training` is the whole loop used by ``megamix train`` when
  ``deepspeed.enabled=true``; it reuses the single-process trainer's model, optimizer, LR schedule
  and evaluation.

Scaling convention of the statistics: ``g_i`` is sample ``i``'s contribution to the gradient that the
optimizer applies, i.e. it includes the loss normalisation, the ``1/gradient_accumulation_steps`` that
``engine.backward`` applies and the ``1/dp_world_size`` of DeepSpeed's gradient averaging. The summed
statistics of a round therefore equal those of a single-process run over the same global batches.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.integrations.capture import LMHeadGradCapture, find_lm_head

log = logging.getLogger("megamix")

_ATTACH_ATTR = "_megamix_deepspeed_hook"
SIDE_FILE = "megamix_rank{rank:05d}.pt"


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
    if t.loss_impl == "fused":
        notes.append("DeepSpeed runs use the generic LM-head capture (any loss, any ZeRO stage); "
                     "train.loss_impl only affects the single-process trainer")
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


def create_engine(model: nn.Module, cfg: MegamixConfig, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine with the single-process trainer's AdamW (weight decay on
    matrices only) and warm-up + cosine LR schedule. Torch's AdamW avoids DeepSpeed's fused_adam build.

    Returns the engine.
    """
    import deepspeed

    from megamix.train.trainer import build_optimizer, lr_at

    ds_config = build_ds_config(cfg, world_size)
    if cfg.deepspeed.skip_op_builds:
        patch_cpu_op_builds()
    optimizer = build_optimizer(model, cfg)
    base = cfg.train.lr

    def make_sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / base)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_sched,
                                           config=ds_config)
    return engine


# ---------------------------------------------------------------------------------------- attach
def _is_engine(obj: Any) -> bool:
    return type(obj).__name__.endswith("Engine") and hasattr(obj, "backward") and hasattr(obj, "module")


def _head_shape(lm_head: nn.Module) -> tuple[int, int]:
    """(V, d) of an LM head, also under ZeRO-3 (where ``weight`` is a placeholder with ``ds_shape``)."""
    W = getattr(lm_head, "weight", None)
    if W is not None:
        shape = tuple(getattr(W, "ds_shape", W.shape))
        if len(shape) == 2 and shape[0] > 0:
            return int(shape[0]), int(shape[1])
    out_f, in_f = getattr(lm_head, "out_features", None), getattr(lm_head, "in_features", None)
    if out_f and in_f:
        return int(out_f), int(in_f)
    raise ValueError("cannot tell the LM head's (V, d); pass vocab_size and hidden_size to attach()")


class DeepSpeedMixerHook:
    """What :func:`attach` returns: wires a Mixer to a training loop.

    Per micro-step: call :meth:`set_batch` before the forward (and optionally :meth:`record_loss`
    after it, for per-domain train losses). The statistics reach ``mixer.stats`` in the backward.
    After each optimizer step, :meth:`after_optimizer_step` runs ``mixer.step``; when attached to a
    DeepSpeed engine with ``auto_step=True`` that happens inside ``engine.step()`` at each
    gradient-accumulation boundary.
    """

    def __init__(self, target: nn.Module, mixer: Any, lm_head: nn.Module, *, dp_world_size: int,
                 auto_step: bool, vocab_size: int | None = None, hidden_size: int | None = None):
        V, d = (vocab_size, hidden_size) if vocab_size and hidden_size else _head_shape(lm_head)
        device = _module_device(lm_head)
        projection = mixer.projection_for(V, d, device)
        self.target = target
        self.mixer = mixer
        self.lm_head = lm_head
        self.dp_world_size = int(dp_world_size)
        self.scale = 1.0 / self.dp_world_size
        self.last_update: dict | None = None
        self.micro_steps = 0
        self.capture = LMHeadGradCapture(lm_head, projection, self._on_grads)
        self._patched_step = False
        if auto_step and _is_engine(target):
            self._patch_engine_step(target)

    # per micro-step ------------------------------------------------------------------------------
    def set_batch(self, batch: Any) -> None:
        """Bind the next forward to ``batch`` (needs ``domain_ids``; ``sample_ids`` optional)."""
        if getattr(batch, "domain_ids", None) is None:
            raise ValueError("set_batch needs a batch with domain_ids (a megamix loader Batch)")
        self.capture.set_context({"batch": batch, "loss_sum": None, "count": None})

    def record_loss(self, token_loss: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
        """Per-sample train-loss totals of the current micro-batch (token_loss, labels: ``[b, T]``)."""
        ctx = self.capture.context
        if ctx is None:
            raise RuntimeError("record_loss before set_batch")
        valid = labels != ignore_index
        ctx["loss_sum"] = (token_loss.detach().float() * valid).sum(1).double()
        ctx["count"] = valid.sum(1).double()

    def _on_grads(self, g: torch.Tensor, ctx: dict | None) -> None:
        if ctx is None:
            raise RuntimeError("megamix: a backward ran through the LM head without set_batch(batch) before "
                               "its forward; call hook.set_batch(batch) for every micro-batch")
        batch = ctx["batch"]
        if g.shape[0] != batch.domain_ids.shape[0]:
            raise RuntimeError(f"megamix: the LM head saw {g.shape[0]} samples but the bound batch has "
                               f"{batch.domain_ids.shape[0]}; was set_batch called with the right batch?")
        self.micro_steps += 1
        # g stays on its device: with NCCL the accumulators must live on the GPU for the all-reduce
        g = self.mixer.projection.finalize(g)  # optional dense second stage (projection.k)
        self.mixer.stats.update(g * self.scale, batch.domain_ids,
                                sample_ids=getattr(batch, "sample_ids", None),
                                token_loss_sum=ctx["loss_sum"], token_count=ctx["count"])

    # per optimizer step --------------------------------------------------------------------------
    def after_optimizer_step(self, step: int) -> dict | None:
        """Run ``mixer.step(step)`` (0-based step just completed). Returns its update dict or None."""
        self.last_update = self.mixer.step(step)
        return self.last_update

    def _patch_engine_step(self, engine) -> None:
        cls_step = type(engine).step

        def step(*args, **kwargs):
            before = engine.global_steps
            out = cls_step(engine, *args, **kwargs)
            if engine.global_steps != before:
                self.after_optimizer_step(engine.global_steps - 1)
            return out

        engine.step = step
        self._patched_step = True

    def remove(self) -> None:
        """Detach everything (idempotent)."""
        self.capture.remove()
        if self._patched_step and "step" in vars(self.target):
            del self.target.step
        self._patched_step = False
        if getattr(self.target, _ATTACH_ATTR, None) is self:
            delattr(self.target, _ATTACH_ATTR)


def _module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def attach(engine_or_model: nn.Module, mixer: Any, *, lm_head: nn.Module | None = None,
           dp_world_size: int | None = None, auto_step: bool = True, vocab_size: int | None = None,
           hidden_size: int | None = None) -> DeepSpeedMixerHook:
    """Opt-in: feed a Mixer from an existing training loop. Idempotent.

    Args:
        engine_or_model: a DeepSpeed engine or a plain ``nn.Module``.
        mixer: a :class:`megamix.mixer.Mixer` (its ``stats``, ``step`` and projection are used).
        lm_head: the LM-head module (default: found with :func:`~megamix.integrations.capture.find_lm_head`).
        dp_world_size: data-parallel size for the gradient-averaging scale (default: the engine's, else
            ``mixer.world_size``).
        auto_step: on a DeepSpeed engine, run ``mixer.step`` inside ``engine.step()`` at each
            gradient-accumulation boundary. Otherwise call ``hook.after_optimizer_step(step)``.
        vocab_size, hidden_size: the LM head's (V, d) when they cannot be read from it.

    Attaching the same mixer again returns the existing hook; attaching a different mixer replaces it.
    """
    existing = getattr(engine_or_model, _ATTACH_ATTR, None)
    if existing is not None:
        if existing.mixer is mixer:
            return existing
        existing.remove()
    head = lm_head if lm_head is not None else find_lm_head(engine_or_model)
    if dp_world_size is None:
        dp_world_size = getattr(engine_or_model, "dp_world_size", None) or getattr(mixer, "world_size", 1)
    hook = DeepSpeedMixerHook(engine_or_model, mixer, head, dp_world_size=dp_world_size, auto_step=auto_step,
                              vocab_size=vocab_size, hidden_size=hidden_size)
    setattr(engine_or_model, _ATTACH_ATTR, hook)
    return hook


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, mixer: Any, save_dir: str | Path, step: int, *, rank: int,
                    extra: dict | None = None) -> Path:
    """Save the DeepSpeed checkpoint (tag ``step_XXXXXXX``) and this rank's mixer side file.

    Every rank must call it (DeepSpeed's save is collective).
    """
    save_dir = Path(save_dir)
    tag = f"step_{step:07d}"
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"megamix_step": step})
    side = {"step": step, "mixer": mixer.state_dict(), "torch_rng": torch.get_rng_state(),
            "world_size": getattr(mixer, "world_size", None), "extra": extra or {}}
    path = save_dir / tag / SIDE_FILE.format(rank=rank)
    tmp = path.with_suffix(".tmp")
    torch.save(side, tmp)
    tmp.replace(path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return save_dir / tag


def latest_tag(save_dir: str | Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file points to, if a complete checkpoint exists."""
    p = Path(save_dir) / "latest"
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (Path(save_dir) / tag).is_dir() else None


def load_checkpoint(engine, mixer: Any, save_dir: str | Path, *, rank: int, tag: str | None = None
                    ) -> dict | None:
    """Restore engine + mixer from ``save_dir`` (latest tag by default). Returns the side-file dict
    (``step``, ``extra``) or None when there is no checkpoint."""
    tag = tag or latest_tag(save_dir)
    if tag is None:
        return None
    side_path = Path(save_dir) / tag / SIDE_FILE.format(rank=rank)
    if not side_path.is_file():
        raise ConfigError(f"{side_path} is missing: the checkpoint was written by a different number of "
                          "ranks (megamix keeps one side file per rank); resume with the same world size")
    side = torch.load(side_path, map_location="cpu", weights_only=False)
    ws = side.get("world_size")
    if ws is not None and ws != getattr(mixer, "world_size", ws):
        raise ConfigError(f"checkpoint {tag} was written with world_size={ws}, this run has "
                          f"{mixer.world_size}; resume with the same world size")
    path, _client = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {Path(save_dir) / tag}")
    mixer.load_state_dict(side["mixer"])
    torch.set_rng_state(side["torch_rng"])
    return side


# ---------------------------------------------------------------------------------------- training
@dataclass
class DeepSpeedTrainResult:
    """What :func:`run_deepspeed_training` returns on every rank (rank 0 also writes result.json)."""

    out_dir: str
    rank: int
    world_size: int
    steps: int
    start_step: int
    valid_loss: dict[str, float]
    valid_loss_avg: float
    train_loss: float
    weights: dict[str, float]
    weight_history: list = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)   # global mean train loss of each step run
    step_seconds: list[float] = field(default_factory=list)
    tokens_per_second: float = float("nan")
    wall_seconds: float = float("nan")
    megamix: bool = True


_POS_WARNED = False


def model_positions(batch: Any, model: nn.Module) -> torch.Tensor | None:
    """The batch's document-reset ``position_ids`` if the model can embed them, else None (0..T-1).

    The loader's positions keep a window's offset inside its document, which can exceed a GPT-2
    ``n_positions`` equal to ``seq_len``; then the model's default positions are used (with a warning).
    """
    global _POS_WARNED
    pos = getattr(batch, "position_ids", None)
    n_pos = getattr(getattr(model, "config", None), "n_positions", None)
    if pos is None or n_pos is None or int(pos.max()) < n_pos:
        return pos
    if not _POS_WARNED:
        log.warning("megamix: loader position_ids reach %d >= model n_positions %d; using positions 0..T-1",
                    int(pos.max()), n_pos)
        _POS_WARNED = True
    return None


@torch.no_grad()
def evaluate_engine(engine, store: Any, domains: list[str], cfg: MegamixConfig) -> dict[str, float]:
    """Mean validation token loss per domain through the engine's module forward.

    Same batches as the single-process trainer's evaluation (``eval_batches`` with
    ``train.micro_batch_size`` and ``train.eval_batches``). Going through the module forward lets
    ZeRO-3 gather each layer's parameters as usual. Every rank must call it (ZeRO-3 gathers are
    collective); all ranks get the same numbers.
    """
    from megamix.loader import eval_batches

    module = engine.module
    was_training = module.training
    module.eval()
    out: dict[str, float] = {}
    V = cfg.model.vocab_size
    for d in domains:
        tot, n = 0.0, 0
        for batch in eval_batches(store, d, seq_len=cfg.model.seq_len, batch_size=cfg.train.micro_batch_size,
                                  max_batches=cfg.train.eval_batches):
            labels = batch.labels.to(engine.device)
            pos = model_positions(batch, module)
            logits = module(input_ids=batch.input_ids.to(engine.device),
                            position_ids=None if pos is None else pos.to(engine.device), use_cache=False).logits
            tot += float(F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                                         reduction="sum"))
            n += int((labels != -100).sum())
        out[d] = tot / n if n else float("nan")
    if was_training:
        module.train()
    return out


def _mean_over_ranks(x: float, world_size: int, device: torch.device) -> float:
    if world_size > 1 and torch.distributed.is_initialized():
        t = torch.tensor([x], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / world_size
    return x


def run_deepspeed_training(cfg: MegamixConfig, rank: int, world_size: int, *, progress: bool = True,
                           stop_at_step: int | None = None, store: Any = None) -> DeepSpeedTrainResult:
    """Pretrain through a DeepSpeed engine with online mixing; every rank calls this.

    Args:
        cfg: the run config (``deepspeed.enabled`` is not required here; ``megamix train`` checks it).
        rank, world_size: this process's data-parallel position (from the launcher).
        progress: tqdm bar on rank 0.
        stop_at_step: stop (and checkpoint) after this many completed steps even if ``train.steps`` is
            larger, e.g. to fit a job's time limit; the LR schedule still follows ``train.steps``.
        store: an open TokenStore (default: ``<data.data_dir>/tokens``).

    Megamix is active when ``projection.enabled`` (the statistics) is true; with ``projection.enabled=
    false`` and a static strategy this is a plain DeepSpeed run over the same data (the baseline for
    overhead measurements).
    """
    from tqdm.auto import tqdm

    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    from megamix.train.metrics import MetricsLogger
    from megamix.train.model import build_model, count_parameters
    from megamix.train.trainer import lr_at

    validate_launch(cfg, world_size)
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    init_distributed(cfg.deepspeed.backend, rank=rank, world_size=world_size,
                     skip_op_builds=cfg.deepspeed.skip_op_builds)
    out_dir = Path(t.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    store = store or TokenStore(Path(cfg.data.data_dir) / "tokens")
    if store.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"token store vocabulary ({store.vocab_size}) exceeds model.vocab_size "
                          f"({cfg.model.vocab_size}); set model.vocab_size={store.vocab_size}")
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, seed=t.seed)
    n_params = count_parameters(model)
    mixer = Mixer(cfg, store, rank=rank, world_size=world_size, group=None)
    engine = create_engine(model, cfg, world_size)
    use_megamix = bool(cfg.projection.enabled)
    hook = attach(engine, mixer, auto_step=False, vocab_size=cfg.model.vocab_size,
                  hidden_size=cfg.model.n_embd) if use_megamix else None
    ckpt_dir = out_dir / "ds_checkpoints"
    start = 0
    if t.resume:
        side = load_checkpoint(engine, mixer, ckpt_dir, rank=rank)
        if side is not None:
            start = int(side["step"])
            if rank == 0:
                print(f"resumed from {ckpt_dir / latest_tag(ckpt_dir)} at step {start}")
    logger = MetricsLogger(out_dir, enabled=(rank == 0))
    if rank == 0:
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
        if start == 0:
            logger.log("run", 0, params=n_params, domains=mixer.domains, world_size=world_size,
                       zero_stage=cfg.deepspeed.zero_stage, megamix=use_megamix,
                       tokens_per_step=t.global_batch_size * cfg.model.seq_len)
            logger.log("weights", 0, weights=dict(zip(mixer.domains, mixer.weights.tolist())))
    device = engine.device
    V = cfg.model.vocab_size
    end = t.steps if stop_at_step is None else min(t.steps, stop_at_step)
    tokens_per_step = t.global_batch_size * cfg.model.seq_len
    step_losses: list[float] = []
    step_times: list[float] = []
    last_loss = float("nan")
    t0 = time.time()
    engine.train()
    bar = tqdm(range(start, end), desc=f"train[ds z{cfg.deepspeed.zero_stage}]", disable=not (progress and rank == 0),
               initial=start, total=t.steps)
    for step in bar:
        ts = time.perf_counter()
        loss_acc = 0.0
        micro = mixer.next_step()
        for batch in micro:
            if hook is not None:
                hook.set_batch(batch)
            ids = batch.input_ids.to(device)
            labels = batch.labels.to(device)
            pos = model_positions(batch, engine.module)
            out = engine(input_ids=ids, position_ids=None if pos is None else pos.to(device), use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            token_loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                                         reduction="none").reshape(labels.shape)
            n_valid = (labels != -100).sum().clamp(min=1)
            loss = token_loss.sum() / n_valid
            if hook is not None:
                hook.record_loss(token_loss, labels)
            engine.backward(loss)
            engine.step()
            loss_acc += float(loss.detach()) / len(micro)
        update = hook.after_optimizer_step(step) if hook is not None else mixer.step(step)
        step_times.append(time.perf_counter() - ts)
        last_loss = _mean_over_ranks(loss_acc, world_size, device)
        step_losses.append(last_loss)
        done = step + 1
        if update is not None and rank == 0:
            snap = update["snapshot"]
            logger.log("mixing", done, domain_train_loss=dict(zip(mixer.domains, snap.domain_loss.tolist())),
                       counts=dict(zip(mixer.domains, snap.counts.tolist())), gram=np.asarray(snap.gram).tolist())
            if update["changed"]:
                logger.log("weights", done, weights=dict(zip(mixer.domains, update["weights"].tolist())))
        if rank == 0 and (done % t.log_every == 0 or done == end):
            med = float(np.median(step_times[-t.log_every:]))
            logger.log("train", done, loss=last_loss, lr=lr_at(step, cfg), step_seconds=med,
                       tokens_per_second=tokens_per_step / med, realised_share=mixer.loader.telemetry().get(
                           "realised_share", {}))
            bar.set_postfix(loss=f"{last_loss:.3f}")
        if (t.eval_every and done % t.eval_every == 0) or done == end:
            vl = evaluate_engine(engine, store, mixer.domains, cfg)
            if rank == 0:
                logger.log("eval", done, valid_loss=vl, valid_loss_avg=_avg(vl))
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == end:
            save_checkpoint(engine, mixer, ckpt_dir, done, rank=rank)
    bar.close()
    wall = time.time() - t0
    if start >= end:  # nothing left to run: evaluate the restored model
        vl = evaluate_engine(engine, store, mixer.domains, cfg)
    logger.close()
    result = DeepSpeedTrainResult(
        out_dir=str(out_dir), rank=rank, world_size=world_size, steps=end, start_step=start, valid_loss=vl,
        valid_loss_avg=_avg(vl), train_loss=last_loss, weights=dict(zip(mixer.domains, mixer.weights.tolist())),
        weight_history=[list(x) for x in mixer.weight_history], step_losses=step_losses, step_seconds=step_times,
        tokens_per_second=tokens_per_step / float(np.median(step_times)) if step_times else float("nan"),
        wall_seconds=wall, megamix=use_megamix)
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps(result.__dict__, indent=1, default=float))
        if progress:
            print(f"\nDeepSpeed ZeRO-{cfg.deepspeed.zero_stage} x{world_size}: steps {start}->{end}, "
                  f"final per-domain validation loss (avg {result.valid_loss_avg:.4f}):")
            for d in mixer.domains:
                print(f"  {d:24s} {vl[d]:7.4f}   weight {result.weights[d]:.3f}")
            print(f"throughput: {result.tokens_per_second:.0f} tokens/s; wall {wall:.0f}s; "
                  f"metrics: {out_dir / 'metrics.jsonl'}")
    if hook is not None:
        hook.remove()
    return result


def _avg(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if v == v and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


__all__ = ["gradient_accumulation_steps", "build_ds_config", "validate_launch", "patch_cpu_op_builds",
           "init_distributed", "create_engine", "attach", "DeepSpeedMixerHook", "save_checkpoint",
           "load_checkpoint", "latest_tag", "run_deepspeed_training", "DeepSpeedTrainResult", "evaluate_engine",
           "model_positions"]

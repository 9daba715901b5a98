"""The one training loop: pretraining with static or online mixing, on any backend.

One optimizer step = ``train.global_batch_size`` sequences drawn by the Mixer's weighted loader (this
rank's slice, in micro-batches). The LM head's loss is, per ``train.loss_impl``:

- ``fused`` (default): megamix's chunked fused linear cross-entropy through the Hugging Face patch
  (:func:`megamix.integrations.hf.apply_megamix`): no ``[B, T, V]`` logits, and the projected
  per-sample gradients come out of the cross-entropy pass (Triton on GPU). Under ZeRO-3 the head
  weight is registered with DeepSpeed. A model class the patch does not support falls back to
  ``capture`` (logged, and recorded as the path that ran).
- ``capture``: the model's own logits + cross-entropy, with the capture hook
  (:func:`megamix.integrations.attach`) reading δ in the backward.
- ``torch``: the model's own logits + cross-entropy, no statistics (static mixing only; the baseline
  for overhead measurements).

Every ``mixing.update_every`` steps the Mixer all-reduces the statistics, runs the strategy and
pushes new weights to every rank's loader. Per-domain validation loss, weights and throughput go to
``metrics.jsonl`` (+ TensorBoard); checkpoints follow :mod:`megamix.train.checkpoint`; a PNG of the
curves and ``result.json`` are written at the end. The backend (:mod:`megamix.train.backend`)
decides how the model is run: plain PyTorch, torch DDP, or a DeepSpeed engine (ZeRO 0-3) on any number of ranks.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from megamix import comm
from megamix.config import MegamixConfig
from megamix.integrations.hf import apply_megamix, body_hidden_states, check_supported
from megamix.integrations.hook import attach
from megamix.train.backend import Backend, make_backend
from megamix.train.checkpoint import Checkpoints
from megamix.train.guard import NonFiniteError, NonFiniteGuard
from megamix.train.metrics import MetricsLogger, mixture_fields, read_metrics
from megamix.train.model import build_model, count_parameters, model_inputs
from megamix.train.optim import build_optimizer
from megamix.train.progress import StepReporter
from megamix.train.stop import StopRequested, check_stop

log = logging.getLogger("megamix")


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank (rank 0 also writes it to ``<out_dir>/result.json``)."""

    out_dir: str
    steps: int                       # the step the run stopped at
    start_step: int                  # the step it resumed from (0 for a fresh run)
    valid_loss: dict[str, float]
    valid_loss_avg: float
    train_loss: float
    weights: dict[str, float]
    tokens_per_second: float
    wall_seconds: float
    backend: str = "plain"           # plain | ddp | deepspeed
    world_size: int = 1
    lm_head_path: str = "fused"      # fused | capture | torch: how the LM-head loss and statistics ran
    peak_rss_mb: float = float("nan")        # this process's peak resident memory
    peak_device_mb: float = float("nan")     # peak CUDA memory allocated by torch (NaN on CPU)
    history: list[dict] = field(default_factory=list)          # evaluations: step, valid_loss
    weight_history: list = field(default_factory=list)         # (step, weights) of every change
    step_losses: list[float] = field(default_factory=list)     # mean train loss of each step run here
    step_seconds: list[float] = field(default_factory=list)
    plot: str | None = None


def lr_at(step: int, cfg: MegamixConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ------------------------------------------------------------------------------------------- LM head
class LMHead:
    """The LM-head loss of the loop for one of the three paths (see the module docstring)."""

    def __init__(self, cfg: MegamixConfig, backend: Backend, mixer: Any):
        self.backend = backend
        self.vocab_size = backend.model.config.vocab_size
        self.doc_masking = cfg.model.doc_masking
        self.patch = self.hook = None
        path = cfg.train.loss_impl
        if path == "fused":
            try:
                check_supported(backend.model)
            except TypeError as e:
                log.warning("megamix: %s; falling back to the capture path", e)
                path = "capture"
        if path == "fused":
            self.patch = apply_megamix(backend.model, mixer)
        elif path == "capture" and cfg.projection.enabled:
            self.hook = attach(backend.module, mixer, auto_step=False, dp_world_size=backend.world_size,
                               vocab_size=self.vocab_size, hidden_size=backend.model.config.hidden_size)
        self.path = path

    def inputs(self, batch) -> dict:
        """The forward's inputs on the device: ids, positions and the document mask (model.doc_masking)."""
        return model_inputs(batch, self.backend.model, self.doc_masking, self.backend.device)

    def loss(self, batch) -> torch.Tensor:
        """Mean token cross-entropy of a micro-batch (statistics recorded on the way); no host sync."""
        kw, labels = self.inputs(batch), batch.labels.to(self.backend.device, non_blocking=True)
        with self.backend.autocast():
            if self.patch is not None:
                self.patch.set_batch(batch)
                return self.backend.module(**kw, shift_labels=labels, use_cache=False).loss
            if self.hook is not None:
                self.hook.set_batch(batch)
            logits = self.backend.module(**kw, use_cache=False).logits
        token_loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), labels.reshape(-1),
                                     ignore_index=-100, reduction="none").reshape(labels.shape)
        if self.hook is not None:
            self.hook.record_loss(token_loss, labels)
        return token_loss.sum() / (labels != -100).sum().clamp(min=1)

    @torch.no_grad()
    def eval_loss_sum(self, batch) -> tuple[torch.Tensor, int]:
        """(summed token loss as a device scalar, number of target tokens) of a validation batch, no statistics."""
        n = int((batch.labels != -100).sum())          # the loader's host labels: no device read
        kw, labels = self.inputs(batch), batch.labels.to(self.backend.device, non_blocking=True)
        with self.backend.autocast():
            if self.patch is not None:
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
        for h in (self.patch, self.hook):
            if h is not None:
                h.remove()


def evaluate(head: LMHead, store, domains: list[str], cfg: MegamixConfig) -> dict[str, float]:
    """Mean validation token loss per domain over ``train.eval_batches`` deterministic batches.

    Every rank computes the same numbers (under ZeRO-3 every rank must call it: gathers are collective)."""
    from megamix.loader import eval_batches

    model = head.backend.model
    was_training = model.training
    model.eval()
    totals, counts = [], []
    try:
        for d in domains:
            tot, n = torch.zeros((), dtype=torch.float64, device=head.backend.device), 0
            for batch in eval_batches(store, d, seq_len=cfg.model.seq_len, batch_size=cfg.train.micro_batch_size,
                                      max_batches=cfg.train.eval_batches):
                s, c = head.eval_loss_sum(batch)
                tot = tot + s
                n += c
            totals.append(tot)
            counts.append(n)
    finally:
        model.train(was_training)
    sums = torch.stack(totals).tolist() if totals else []     # one host read per evaluation
    return {d: (t / n if n else float("nan")) for d, t, n in zip(domains, sums, counts)}


def _avg(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if v == v and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint's step (they will be produced again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # blank, or torn by a kill mid-write
            pass
    tmp = path.with_name(path.name + ".tmp")  # atomic: a kill now must not lose the earlier records
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_device_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")


def print_summary(res: TrainResult, domains: list[str]) -> None:
    """The end-of-run table: per-domain validation loss and final weight, throughput, files."""
    print(f"\nbackend {res.backend} x{res.world_size}, LM head {res.lm_head_path}, steps {res.start_step}->{res.steps}; "
          f"final per-domain validation loss (avg {res.valid_loss_avg:.4f}):")
    for d in sorted(domains):
        print(f"  {d:24s} {res.valid_loss.get(d, float('nan')):7.4f}   weight {res.weights.get(d, float('nan')):.3f}")
    print(f"throughput: {res.tokens_per_second:.0f} tokens/s; wall {res.wall_seconds:.0f}s")
    if res.plot:
        print(f"plot: {res.plot}")
    print(f"metrics: {res.out_dir}/metrics.jsonl")


# ------------------------------------------------------------------------------------------- the loop
def train(cfg: MegamixConfig, *, rank: int = 0, world_size: int = 1, backend: Backend | None = None,
          progress: bool = True, log_to_stdout: bool = True, stop_at_step: int | None = None,
          store: Any = None, stop_requested: Callable[[], bool] | None = None,
          checkpoint_hook: Any = None) -> TrainResult:
    """Pretrain as configured; every rank calls it. Returns the :class:`TrainResult` (on every rank).

    Args:
        cfg: the run config.
        rank, world_size: this process's data-parallel position (from the launcher's environment, read
            by the entry point). Ignored when ``backend`` is given.
        backend: default: DeepSpeed when ``deepspeed.enabled``, else DDP when ``world_size > 1``, else plain
            PyTorch (:func:`megamix.train.backend.make_backend`).
        progress: tqdm bar on a terminal, plain log lines every ``train.log_every`` steps otherwise (rank 0).
        log_to_stdout: evaluation lines, plain log lines and the final summary (rank 0).
        stop_at_step: stop (and checkpoint) after this many completed steps although ``train.steps`` is
            larger, e.g. to fit a job's time limit; the LR schedule still follows ``train.steps``.
        store: an open TokenStore (default: ``<data.data_dir>/tokens``).
        stop_requested: asked at every step boundary (e.g. set by a signal handler); when it returns True on
            any rank, the step's checkpoint is saved and :class:`megamix.train.stop.StopRequested` is raised.
        checkpoint_hook: ``f(phase, step, rank)`` called inside each checkpoint save (tests: kill points).
    """
    from megamix.data.backings import open_store
    from megamix.data.corpus import atomic_write_json, atomic_write_text
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    from megamix.train.plots import plot_run_files

    cfg.validate()
    backend = backend or make_backend(cfg, rank, world_size)
    rank, world_size = backend.rank, backend.world_size
    notes = backend.check(cfg)
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    backend.init(cfg)
    main = rank == 0
    out_dir = Path(t.out_dir)
    with comm.together(f"creating train.out_dir={out_dir}", backend.group):   # rank 0 failing stops every rank
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            for note in notes:
                log.info("megamix: %s", note)
    store = store or open_store(cfg.data)
    store.check_vocab(cfg.model.vocab_size)  # a DataError (one line, exit 2) names the mismatch and the fix
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, seed=t.seed)
    n_params = count_parameters(model)
    mixer = Mixer(cfg, store, rank=rank, world_size=world_size, group=None)
    backend.setup(model, build_optimizer(model, cfg), lambda s: lr_at(s, cfg), cfg)
    head = LMHead(cfg, backend, mixer)
    eval_store, eval_domains = store, mixer.domains
    if cfg.data.eval_data_dir:
        eval_store = TokenStore(Path(cfg.data.eval_data_dir) / "tokens")
        eval_domains = list(eval_store.domains)
    ckpt = Checkpoints(out_dir, on_phase=checkpoint_hook)
    start = ckpt.load(backend, mixer, cfg) if t.resume else 0
    metrics_path = out_dir / "metrics.jsonl"
    with comm.together(f"writing the run's files in {out_dir}", backend.group):
        if main:
            if start:
                _truncate_metrics(metrics_path, start)
                if log_to_stdout:
                    print(f"resumed from {ckpt.loaded} at step {start}")
            elif metrics_path.exists():
                metrics_path.unlink()  # a fresh run: drop records of an earlier, unfinished one
            atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
            atomic_write_json(out_dir / "data_manifest.json", store.manifest)  # what was trained on (sources, splits)
    logger = MetricsLogger(out_dir, enabled=main, resume_step=start, logging=cfg.logging, run_config=cfg.to_dict())
    guard = NonFiniteGuard(t.on_nonfinite, logger, main, ckpt.last_checkpoint)
    if start == 0:
        logger.log("run", 0, params=n_params, domains=mixer.domains, world_size=world_size, backend=backend.name,
                   zero_stage=cfg.deepspeed.zero_stage if backend.name == "deepspeed" else None,
                   lm_head_path=head.path, tokens_per_step=t.global_batch_size * cfg.model.seq_len)
        logger.log("weights", 0, weights=dict(zip(mixer.domains, mixer.weights.tolist())))
    if main and log_to_stdout:
        print(f"model: {n_params['total'] / 1e6:.2f}M params ({n_params['non_embedding'] / 1e6:.2f}M non-embedding); "
              f"{len(mixer.domains)} domains; strategy={cfg.mixing.strategy}; backend={backend.name} x{world_size}; "
              f"LM head: {head.path}; {t.global_batch_size}x{cfg.model.seq_len} tokens/step")

    eval_grads = (cfg.mixing.eval_grad_batches > 0 and cfg.projection.enabled)
    step_kwargs = {"hidden_fn": head.hidden_states, "lm_head_weight": head.weight_context} if eval_grads else {}
    end = t.steps if stop_at_step is None else min(t.steps, stop_at_step)
    n_micro = t.global_batch_size // (t.micro_batch_size * world_size)
    tokens_per_step = t.global_batch_size * cfg.model.seq_len
    step_losses: list[float] = []
    step_times: list[float] = []
    last_loss = float("nan")
    vl: dict[str, float] | None = None
    if start >= end and main and log_to_stdout:
        print(f"step {start} already reaches {'stop_at_step' if end < t.steps else 'train.steps'}={end}: nothing to "
              "train; evaluating the checkpoint (raise train.steps to continue)")
    backend.model.train()
    t0 = time.time()
    bar = StepReporter(backend.progress_label(cfg), start, end, t.steps, bar=progress and main,
                       lines=main and (progress or log_to_stdout))
    try:
        for step in bar:
            ts = time.perf_counter()
            backend.before_step(step)
            loss_acc = torch.zeros((), dtype=torch.float64, device=backend.device)
            for batch in mixer.next_step():          # no host sync inside a micro-step
                loss = head.loss(batch)
                backend.backward(loss, n_micro)
                loss_acc += loss.detach().double() / n_micro
            # The step's one host read: the loss averaged over ranks (a NaN on any rank reaches every rank), the
            # gradients' finiteness and a stop request on any rank, from one small all-reduce.
            report = backend.step_report(loss_acc, backend.grad_norm(),
                                         bool(stop_requested()) if stop_requested is not None else False)
            last_loss = report.loss
            skip = guard.check(step + 1, last_loss, report.grads_finite)  # raises under on_nonfinite=stop
            gnorm = backend.optimizer_step(skip=skip)
            if report.grad_norm is not None:   # read with the loss already; else the engine's own (DeepSpeed)
                gnorm = report.grad_norm
            if skip:
                mixer.discard_step()  # the skipped step's statistics never reach the strategy
            update = None if skip else mixer.step(step, **step_kwargs)
            step_times.append(time.perf_counter() - ts)
            step_losses.append(last_loss)
            done = step + 1
            if update is not None:
                snap = update["snapshot"]
                logger.log("mixing", done, domain_train_loss=dict(zip(mixer.domains, snap.domain_loss.tolist())),
                           counts=dict(zip(mixer.domains, snap.counts.tolist())), gram=np.asarray(snap.gram).tolist(),
                           **update.get("log", {}))
                logger.snapshot(snap)
                if update["changed"]:
                    logger.log("weights", done, weights=dict(zip(mixer.domains, update["weights"].tolist())))
            if done % t.log_every == 0 or done == end:
                med = float(np.median(step_times[-t.log_every:]))
                lr_now = backend.current_lr(step)
                gnorm = float(gnorm)
                logger.log("train", done, loss=last_loss, lr=lr_now, grad_norm=gnorm, step_seconds=med,
                           tokens_per_second=tokens_per_step / med, **mixture_fields(mixer.loader.telemetry()))
                bar.log(done, loss=last_loss, tokens_per_second=tokens_per_step / med, lr=lr_now,
                        weights=dict(zip(mixer.domains, mixer.weights.tolist())))
            if (t.eval_every and done % t.eval_every == 0) or done == end:
                vl = evaluate(head, eval_store, eval_domains, cfg)
                logger.log("eval", done, valid_loss=vl, valid_loss_avg=_avg(vl))
                if main and log_to_stdout:
                    bar.write(f"step {done}: train {last_loss:.3f} | valid avg {_avg(vl):.3f} | " +
                              " ".join(f"{k}={v:.2f}" for k, v in vl.items()))
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == end:
                ckpt.save(done, backend, mixer, cfg)
            check_stop(report.stop, done, backend, ckpt, mixer, cfg, last=done == end)
    except BaseException as e:  # leave no open logger, hook or process group behind
        bar.close()
        logger.close()
        head.remove()
        if isinstance(e, (StopRequested, NonFiniteError)):  # every rank stops at the same step
            backend.close()
        raise
    bar.close()
    wall = time.time() - t0
    logger.close()
    if vl is None:  # nothing left to run (resumed at the end): evaluate the restored model
        vl = evaluate(head, eval_store, eval_domains, cfg)
    history = []
    plot = None
    if main:
        history = [{"step": r["step"], "valid_loss": r["valid_loss"]}
                   for r in read_metrics(metrics_path) if r["kind"] == "eval"]
        plot = str(plot_run_files(out_dir, title=f"{cfg.mixing.strategy} — {out_dir.name} "
                                                 f"({backend.name} x{world_size}, {head.path})")[0])
    result = TrainResult(
        out_dir=str(out_dir), steps=max(end, start), start_step=start, valid_loss=vl, valid_loss_avg=_avg(vl),
        train_loss=last_loss, weights=dict(zip(mixer.domains, mixer.weights.tolist())),
        tokens_per_second=tokens_per_step / float(np.median(step_times)) if step_times else float("nan"),
        wall_seconds=wall, backend=backend.name, world_size=world_size, lm_head_path=head.path,
        peak_rss_mb=_peak_rss_mb(), peak_device_mb=_peak_device_mb(backend.device), history=history,
        weight_history=[list(x) for x in mixer.weight_history],
        step_losses=step_losses, step_seconds=step_times, plot=plot)
    if main:
        if step_times or not (out_dir / "result.json").exists():  # a no-op resume keeps the finished run's file
            tmp = out_dir / "result.json.tmp"
            tmp.write_text(json.dumps(asdict(result), indent=1, default=float))
            tmp.replace(out_dir / "result.json")
        if log_to_stdout:
            print_summary(result, eval_domains)
    head.remove()
    backend.close()
    return result


__all__ = ["train", "TrainResult", "lr_at", "build_optimizer", "evaluate", "LMHead", "print_summary"]

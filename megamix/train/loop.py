"""The one training loop: pretraining with static or online mixing, on any backend.

A :class:`Trainer` is built once from the validated config (the pre-flight's store and Mixer, then the model,
backend, LM head and optimizer, and the resume); :meth:`Trainer.train_step` runs one optimizer step and
:meth:`Trainer.fit` runs the steps, handing each step's output to the callbacks (metrics, evaluation,
checkpoint, stop, run files: :mod:`megamix.train.callbacks`). :func:`train` is ``Trainer(...).fit()``.

One optimizer step = ``train.global_batch_size`` sequences drawn by the Mixer's weighted loader (this
rank's slice, in micro-batches); the LM head's loss runs on the path ``train.loss_impl`` chooses
(:mod:`megamix.train.head`). Every ``mixing.update_every`` steps the Mixer all-reduces the statistics, runs
the strategy and pushes new weights to every rank's loader. The backend (:mod:`megamix.train.backend`)
decides how the model is run: plain PyTorch, torch DDP, or a DeepSpeed engine (ZeRO 0-3) on any number of
ranks.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megamix import comm
from megamix.config import MegamixConfig
from megamix.configbase import ConfigError, RunError
from megamix.io import atomic_write_json, atomic_write_text
from megamix.train.backend import Backend, make_backend
from megamix.train.callbacks import Callback, default_callbacks, evaluate, mean_finite, print_summary
from megamix.train.checkpoint import Checkpoints
from megamix.train.guard import NonFiniteGuard
from megamix.train.head import LMHead
from megamix.train.model import build_model, count_parameters
from megamix.train.optim import build_optimizer
from megamix.train.preflight import Preflight, check_run
from megamix.train.progress import StepReporter
from megamix.train.result import StepOutput, TrainResult
from megamix.train.stop import StopRequested

log = logging.getLogger("megamix")


def lr_at(step: int, cfg: MegamixConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


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
    atomic_write_text(path, "".join(line + "\n" for line in keep))  # a kill now must not lose the earlier records


class Trainer:
    """A training run, built once: pre-flight (config, data, Mixer), model, backend, LM head, optimizer, resume.

    Args:
        cfg: the run config.
        backend: default: DeepSpeed when ``deepspeed.enabled``, else DDP when ``world_size > 1``, else plain
            PyTorch (:func:`megamix.train.backend.make_backend`, from ``rank``/``world_size``).
        plan: the pre-flight's result (:func:`megamix.train.preflight.check_run`); run here when not given.
        store: an open TokenStore for the pre-flight (default: the one the config names).
        callbacks: default :func:`megamix.train.callbacks.default_callbacks`.
        progress: tqdm bar on a terminal, plain log lines every ``train.log_every`` steps otherwise (rank 0).
        log_to_stdout: evaluation lines, plain log lines and the final summary (rank 0).
        stop_at_step: stop (and checkpoint) after this many completed steps although ``train.steps`` is
            larger, e.g. to fit a job's time limit; the LR schedule still follows ``train.steps``.
        stop_requested: asked at every step boundary (e.g. set by a signal handler); when it returns True on
            any rank, the step's checkpoint is saved and :class:`megamix.train.stop.StopRequested` is raised.
        checkpoint_hook: ``f(phase, step, rank)`` called inside each checkpoint save (tests: kill points).
        overwrite: delete the checkpoints and files of an earlier run in ``train.out_dir`` and start a new run
            (``megamix train --overwrite``); without it a new run refuses a folder holding checkpoints
            (:meth:`megamix.train.checkpoint.Checkpoints.claim`).
    """

    def __init__(self, cfg: MegamixConfig, *, backend: Backend | None = None, rank: int = 0, world_size: int = 1,
                 plan: Preflight | None = None, store: Any = None, callbacks: list[Callback] | None = None,
                 progress: bool = True, log_to_stdout: bool = True, stop_at_step: int | None = None,
                 stop_requested: Callable[[], bool] | None = None, checkpoint_hook: Any = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.backend = backend = backend or make_backend(cfg, rank, world_size)
        plan = plan or check_run(cfg, backend, store=store)   # every start-up check, once
        self.rank, self.world_size, self.main = backend.rank, backend.world_size, backend.rank == 0
        self.log_to_stdout, self.stop_requested = log_to_stdout, stop_requested
        self.callbacks = default_callbacks() if callbacks is None else list(callbacks)
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        backend.init(cfg)
        self.out_dir = Path(t.out_dir)
        with comm.together(f"creating train.out_dir={self.out_dir}", backend.group):  # rank 0 failing stops all
            if self.main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                for note in plan.notes:
                    log.info("megamix: %s", note)
        self.store, self.mixer = plan.store, plan.mixer
        self.eval_store, self.eval_domains = plan.eval_store, plan.eval_domains
        self.ckpt = Checkpoints(self.out_dir, on_phase=checkpoint_hook)
        self.ckpt.claim(t.resume, overwrite, self.main, backend.group)   # one run per out_dir; its run id
        expect = self.ckpt.resumable() if t.resume else None    # model.init_from is read only at step 0
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, seed=t.seed, load_init=expect is None)
        self.n_params = count_parameters(model)
        backend.setup(model, build_optimizer(model, cfg), lambda s: lr_at(s, cfg), cfg)
        self.head = LMHead(cfg, backend, self.mixer)
        self.start = self.ckpt.load(backend, self.mixer, cfg) if t.resume else 0
        if expect is not None and self.start == 0 and cfg.model.init_from:
            raise ConfigError(f"checkpoint {self.out_dir / 'checkpoints' / expect} looked complete but no checkpoint "
                              f"could be resumed (see the warning above), and model.init_from={cfg.model.init_from} was "
                              "not loaded because a resume was expected: fix or remove the checkpoints, or start a new "
                              "train.out_dir")
        self.end = t.steps if stop_at_step is None else min(t.steps, stop_at_step)
        self.reporter = StepReporter(backend.progress_label(cfg), self.start, self.end, t.steps,
                                     bar=progress and self.main, lines=self.main and (progress or log_to_stdout))
        self._write_run_files()
        self.n_micro = t.global_batch_size // (t.micro_batch_size * self.world_size)
        self.tokens_per_step = t.global_batch_size * cfg.model.seq_len
        eval_grads = cfg.mixing.eval_grad_batches > 0 and cfg.projection.enabled
        self.step_kwargs = ({"hidden_fn": self.head.hidden_states, "lm_head_weight": self.head.weight_context}
                            if eval_grads else {})
        self.step_losses: list[float] = []
        self.step_seconds: list[float] = []
        self.last_loss = float("nan")
        self.valid_loss: dict[str, float] | None = None   # the latest evaluation (EvalCallback)
        self.history: list[dict] = []                      # evaluations read back at the end (RunFilesCallback)
        self.plot: str | None = None
        self.logger = None                                 # MetricsCallback's MetricsLogger
        self.guard = None

    def say(self, line: str) -> None:
        """A line for the user (rank 0, when ``log_to_stdout``), between progress updates."""
        if self.main and self.log_to_stdout:
            self.reporter.write(line)

    def _write_run_files(self) -> None:
        """The run's start-up files (rank 0; a failure there stops every rank): metrics truncated to the resumed
        step (or dropped for a fresh run), ``config.yaml`` and ``data_manifest.json``."""
        metrics_path = self.out_dir / "metrics.jsonl"
        with comm.together(f"writing the run's files in {self.out_dir}", self.backend.group):
            if self.main:
                if self.start:
                    _truncate_metrics(metrics_path, self.start)
                    self.say(f"resumed from {self.ckpt.loaded} at step {self.start}" +
                             (f" (its weights; model.init_from={self.cfg.model.init_from} is read only at step 0)"
                              if self.cfg.model.init_from else ""))
                elif metrics_path.exists():
                    metrics_path.unlink()  # a fresh run: drop records of an earlier, unfinished one
                atomic_write_text(self.out_dir / "config.yaml", self.cfg.to_yaml())
                atomic_write_json(self.out_dir / "data_manifest.json", self.store.manifest)  # what was trained on

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> StepOutput:
        """Optimizer step ``step`` (0-based): micro-batches, backward, the step's one host read, the guard, the
        update, and the Mixer's round."""
        b = self.backend
        ts = time.perf_counter()
        b.before_step(step)
        loss_acc = torch.zeros((), dtype=torch.float64, device=b.device)
        for batch in self.mixer.next_step():          # no host sync inside a micro-step
            loss = self.head.loss(batch)
            b.backward(loss, self.n_micro)
            loss_acc += loss.detach().double() / self.n_micro
        # The step's one host read: the loss averaged over ranks (a NaN on any rank reaches every rank), the
        # gradients' finiteness and a stop request on any rank, from one small all-reduce.
        report = b.step_report(loss_acc, b.grad_norm(),
                               bool(self.stop_requested()) if self.stop_requested is not None else False)
        skip = self.guard.check(step + 1, report.loss, report.grads_finite)  # raises under on_nonfinite=stop
        gnorm = b.optimizer_step(skip=skip)
        if report.grad_norm is not None:   # read with the loss already; else the engine's own (DeepSpeed)
            gnorm = report.grad_norm
        if skip:
            self.mixer.discard_step()  # the skipped step's statistics never reach the strategy
        # a skipped step still closes its round on schedule: the strategy updates from the statistics it has
        update = self.mixer.step(step, **self.step_kwargs)
        self.step_seconds.append(time.perf_counter() - ts)
        self.step_losses.append(report.loss)
        self.last_loss = report.loss
        return StepOutput(step=step + 1, loss=report.loss, grad_norm=gnorm, skipped=skip, update=update,
                          stop=report.stop)

    # ------------------------------------------------------------------ the run
    def fit(self) -> TrainResult:
        """Run steps ``start .. end`` with the callbacks; returns the :class:`TrainResult` (on every rank)."""
        self._start()
        t0 = time.time()
        try:
            for step in self.reporter:
                out = self.train_step(step)
                for cb in self.callbacks:
                    cb.on_step_end(self, out)
        except BaseException as e:  # leave no open logger, hook or process group behind
            self.reporter.close()
            for cb in self.callbacks:
                cb.on_error(self, e)
            self.head.remove()
            if isinstance(e, (StopRequested, RunError)):  # every rank stops at the same step (non-finite, exhausted)
                self.backend.close()
            raise
        self.reporter.close()
        wall = time.time() - t0
        for cb in self.callbacks:
            cb.on_fit_end(self)
        result = self._result(wall)
        for cb in self.callbacks:
            cb.on_result(self, result)
        self.head.remove()
        self.backend.close()
        return result

    def _start(self) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self.guard = NonFiniteGuard(self.cfg.train.on_nonfinite, self.logger, self.main, self.ckpt.last_checkpoint)
        t, n = self.cfg.train, self.n_params
        self.say(f"model: {n['total'] / 1e6:.2f}M params ({n['non_embedding'] / 1e6:.2f}M non-embedding); "
                 f"{len(self.mixer.domains)} domains; strategy={self.cfg.mixing.strategy}; backend={self.backend.name} "
                 f"x{self.world_size}; LM head: {self.head.path}; {t.global_batch_size}x{self.cfg.model.seq_len} "
                 "tokens/step")
        if self.start >= self.end:
            self.say(f"step {self.start} already reaches {'stop_at_step' if self.end < t.steps else 'train.steps'}="
                     f"{self.end}: nothing to train; evaluating the checkpoint (raise train.steps to continue)")
        self.backend.model.train()

    def _result(self, wall: float) -> TrainResult:
        vl, dev = self.valid_loss or {}, self.backend.device
        med = float(np.median(self.step_seconds)) if self.step_seconds else float("nan")
        return TrainResult(
            out_dir=str(self.out_dir), steps=max(self.end, self.start), start_step=self.start, valid_loss=vl,
            valid_loss_avg=mean_finite(vl), train_loss=self.last_loss,
            weights=dict(zip(self.mixer.domains, self.mixer.weights.tolist())),
            tokens_per_second=self.tokens_per_step / med, wall_seconds=wall, backend=self.backend.name,
            world_size=self.world_size, lm_head_path=self.head.path,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,   # Linux reports KiB
            peak_device_mb=torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else float("nan"),
            history=self.history, weight_history=[list(x) for x in self.mixer.weight_history],
            step_losses=self.step_losses, step_seconds=self.step_seconds, plot=self.plot)


def train(cfg: MegamixConfig, *, rank: int = 0, world_size: int = 1, backend: Backend | None = None,
          progress: bool = True, log_to_stdout: bool = True, stop_at_step: int | None = None,
          store: Any = None, stop_requested: Callable[[], bool] | None = None,
          checkpoint_hook: Any = None, plan: Preflight | None = None, overwrite: bool = False) -> TrainResult:
    """Pretrain as configured; every rank calls it: ``Trainer(cfg, ...).fit()`` (see :class:`Trainer` for the
    arguments). Returns the :class:`TrainResult` on every rank."""
    return Trainer(cfg, backend=backend, rank=rank, world_size=world_size, plan=plan, store=store,
                   progress=progress, log_to_stdout=log_to_stdout, stop_at_step=stop_at_step,
                   stop_requested=stop_requested, checkpoint_hook=checkpoint_hook, overwrite=overwrite).fit()


__all__ = ["train", "Trainer", "TrainResult", "StepOutput", "lr_at", "build_optimizer", "evaluate", "LMHead",
           "print_summary"]

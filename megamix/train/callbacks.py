"""What happens around each training step, as callbacks with one interface: metrics, evaluation, checkpoints,
the stop signal, and the run's files at the end (plots, ``result.json``, the summary table).

The :class:`~megamix.train.loop.Trainer` calls every callback, in order, at each point of the run::

    on_fit_start(trainer)             after the build and the resume, before the first step
    on_step_end(trainer, out)         after each optimizer step (out: StepOutput)
    on_fit_end(trainer)               after the last step (nothing more is logged after it)
    on_result(trainer, result)        with the run's TrainResult
    on_error(trainer, error)          when the run stops with an exception (then it is re-raised)

The default list (:func:`default_callbacks`) is metrics, evaluation, checkpoint, stop, run files: a step's
records are logged before it is evaluated, evaluated before it is checkpointed, and checkpointed before a stop
request ends the run. Every rank runs every callback (evaluation and checkpoints are collective); only the
main rank writes and prints.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from megamix.io import atomic_write_text
from megamix.loader import eval_batches
from megamix.train.metrics import MetricsLogger, mixture_fields, read_metrics
from megamix.train.plots import plot_run_files
from megamix.train.stop import check_stop
from megamix.train.result import StepOutput, TrainResult

Trainer = Any   # megamix.train.loop.Trainer (which imports this module): the object every callback is handed


class Callback:
    """No-op base: override the points you need (see the module docstring)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    def on_result(self, trainer: Trainer, result: TrainResult) -> None:
        pass

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        pass


def evaluate(head, store, domains: list[str], cfg) -> dict[str, float]:
    """Mean validation token loss per domain over ``train.eval_batches`` deterministic batches.

    Every rank computes the same numbers (under ZeRO-3 every rank must call it: gathers are collective)."""
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


def mean_finite(d: dict[str, float]) -> float:
    """The mean of the finite values (NaN when there are none)."""
    vals = [v for v in d.values() if v == v and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


class MetricsCallback(Callback):
    """``metrics.jsonl`` (+ TensorBoard/W&B): the run header, mixing rounds and snapshots, weight changes, and
    every ``train.log_every`` steps the training line (also on the progress reporter)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        tr, cfg = trainer, trainer.cfg
        tr.logger = MetricsLogger(tr.out_dir, enabled=tr.main, resume_step=tr.start, logging=cfg.logging,
                                  run_config=cfg.to_dict())
        if tr.start == 0:
            tr.logger.log("run", 0, params=tr.n_params, domains=tr.mixer.domains, world_size=tr.world_size,
                          backend=tr.backend.name,
                          zero_stage=cfg.deepspeed.zero_stage if tr.backend.name == "deepspeed" else None,
                          lm_head_path=tr.head.path, tokens_per_step=tr.tokens_per_step)
            tr.logger.log("weights", 0, weights=dict(zip(tr.mixer.domains, tr.mixer.weights.tolist())))

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        tr, done, log_every = trainer, out.step, trainer.cfg.train.log_every
        domains = tr.mixer.domains
        if out.update is not None:
            snap = out.update["snapshot"]
            tr.logger.log("mixing", done, domain_train_loss=dict(zip(domains, snap.domain_loss.tolist())),
                          counts=dict(zip(domains, snap.counts.tolist())), gram=np.asarray(snap.gram).tolist(),
                          **out.update.get("log", {}))
            tr.logger.snapshot(snap)
            if out.update["changed"]:
                tr.logger.log("weights", done, weights=dict(zip(domains, out.update["weights"].tolist())))
        if done % log_every == 0 or done == tr.end:
            med = float(np.median(tr.step_seconds[-log_every:]))
            lr_now = tr.backend.current_lr(done - 1)
            tr.logger.log("train", done, loss=out.loss, lr=lr_now, grad_norm=float(out.grad_norm), step_seconds=med,
                          tokens_per_second=tr.tokens_per_step / med, **mixture_fields(tr.mixer.loader.telemetry()))
            tr.reporter.log(done, loss=out.loss, tokens_per_second=tr.tokens_per_step / med, lr=lr_now,
                            weights=dict(zip(domains, tr.mixer.weights.tolist())))

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.logger.close()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        if getattr(trainer, "logger", None) is not None:
            trainer.logger.close()


class EvalCallback(Callback):
    """Per-domain validation loss every ``train.eval_every`` steps and at the last step (``trainer.valid_loss``);
    a run with nothing left to train evaluates the restored model at its end."""

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        every = trainer.cfg.train.eval_every
        if (every and out.step % every == 0) or out.step == trainer.end:
            self._evaluate(trainer, out.step, out.loss)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.valid_loss is None:   # nothing left to run (resumed at the end): evaluate the restored model
            trainer.valid_loss = evaluate(trainer.head, trainer.eval_store, trainer.eval_domains, trainer.cfg)

    @staticmethod
    def _evaluate(trainer: Trainer, done: int, train_loss: float) -> None:
        vl = evaluate(trainer.head, trainer.eval_store, trainer.eval_domains, trainer.cfg)
        trainer.valid_loss = vl
        trainer.logger.log("eval", done, valid_loss=vl, valid_loss_avg=mean_finite(vl))
        trainer.say(f"step {done}: train {train_loss:.3f} | valid avg {mean_finite(vl):.3f} | " +
                    " ".join(f"{k}={v:.2f}" for k, v in vl.items()))


class CheckpointCallback(Callback):
    """A checkpoint every ``train.checkpoint_every`` steps and at the last step (:mod:`megamix.train.checkpoint`)."""

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        every = trainer.cfg.train.checkpoint_every
        if (every and out.step % every == 0) or out.step == trainer.end:
            trainer.ckpt.save(out.step, trainer.backend, trainer.mixer, trainer.cfg)


class StopCallback(Callback):
    """A stop request on any rank (already agreed in the step's one read) ends the run after this step's
    checkpoint (:func:`megamix.train.stop.check_stop` raises StopRequested on every rank)."""

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        check_stop(out.stop, out.step, trainer.backend, trainer.ckpt, trainer.mixer, trainer.cfg,
                   last=out.step == trainer.end)


class RunFilesCallback(Callback):
    """At the end (main rank): the evaluation history, the curves' PNG, ``result.json`` and the summary table."""

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.main:
            return
        trainer.history = [{"step": r["step"], "valid_loss": r["valid_loss"]}
                           for r in read_metrics(trainer.out_dir / "metrics.jsonl") if r["kind"] == "eval"]
        title = (f"{trainer.cfg.mixing.strategy} — {trainer.out_dir.name} "
                 f"({trainer.backend.name} x{trainer.world_size}, {trainer.head.path})")
        trainer.plot = str(plot_run_files(trainer.out_dir, title=title)[0])

    def on_result(self, trainer: Trainer, result: TrainResult) -> None:
        if not trainer.main:
            return
        path = trainer.out_dir / "result.json"
        if trainer.step_seconds or not path.exists():  # a no-op resume keeps the finished run's file
            atomic_write_text(path, json.dumps(asdict(result), indent=1, default=float))
        for line in summary_lines(result, trainer.eval_domains):
            trainer.say(line)


def summary_lines(res: TrainResult, domains: list[str]) -> list[str]:
    """The end-of-run table: per-domain validation loss and final weight, throughput, files."""
    lines = [f"\nbackend {res.backend} x{res.world_size}, LM head {res.lm_head_path}, steps {res.start_step}->"
             f"{res.steps}; final per-domain validation loss (avg {res.valid_loss_avg:.4f}):"]
    lines += [f"  {d:24s} {res.valid_loss.get(d, float('nan')):7.4f}   weight {res.weights.get(d, float('nan')):.3f}"
              for d in sorted(domains)]
    lines.append(f"throughput: {res.tokens_per_second:.0f} tokens/s; wall {res.wall_seconds:.0f}s")
    if res.plot:
        lines.append(f"plot: {res.plot}")
    lines.append(f"metrics: {res.out_dir}/metrics.jsonl")
    return lines


def print_summary(res: TrainResult, domains: list[str]) -> None:
    """Print :func:`summary_lines` (for callers outside a run, e.g. a notebook)."""
    print("\n".join(summary_lines(res, domains)))


def default_callbacks() -> list[Callback]:
    """Metrics, evaluation, checkpoint, stop, run files: the order the module docstring explains."""
    return [MetricsCallback(), EvalCallback(), CheckpointCallback(), StopCallback(), RunFilesCallback()]


__all__ = ["Callback", "MetricsCallback", "EvalCallback", "CheckpointCallback", "StopCallback", "RunFilesCallback",
           "default_callbacks", "evaluate", "mean_finite", "summary_lines", "print_summary"]

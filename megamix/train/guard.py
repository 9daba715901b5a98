"""The non-finite guard of the training loop (``train.on_nonfinite``).

Before every optimizer step the loop asks :meth:`NonFiniteGuard.check` whether the step may be applied. The
loss it passes is already the mean over data-parallel ranks (a NaN/Inf on any rank makes it non-finite, so
every rank takes the same decision without another collective), and ``grads_finite`` is the backend's check of
the accumulated gradients (the plain backend computes the gradient norm; a DeepSpeed engine checks its
partitions itself). On a non-finite step:

- ``stop``: raise :class:`NonFiniteError` before the optimizer applies anything, so no non-finite state is
  trained on or saved (the CLI prints the one-line message and exits with code 2);
- ``skip``: the loop drops the step (no optimizer step, the step's statistics never reach the mixing
  strategy); the event is counted, logged as a ``nonfinite`` record in ``metrics.jsonl`` and as a warning.
  More than :data:`MAX_CONSECUTIVE_SKIPS` skipped steps in a row stop the run anyway: the model or the data
  is broken, not one batch.

Checkpoints refuse non-finite parameters on their own (:meth:`megamix.train.checkpoint.Checkpoints.save`).
"""
from __future__ import annotations

import logging
import math
from typing import Any

from megamix.configbase import ConfigError, RunError

log = logging.getLogger("megamix")

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteError(RunError):
    """Training met a NaN/Inf it must not train on or save (a run failure, not a config error: exit code 2
    from the CLI, with the one-line message)."""


class NonFiniteGuard:
    """Decides, per step, whether a non-finite step is skipped or stops the run.

    Args:
        mode: ``skip`` | ``stop`` (``train.on_nonfinite``).
        logger: a :class:`megamix.train.metrics.MetricsLogger` (or None) for the ``nonfinite`` records.
        main: this process logs the warning line (rank 0).
        last_checkpoint: zero-argument callable returning the checkpoint a resume would restart from (or
            None), named in the stop message.
    """

    def __init__(self, mode: str, logger: Any = None, main: bool = True, last_checkpoint: Any = None):
        if mode not in ("skip", "stop"):
            raise ConfigError(f"train.on_nonfinite must be 'skip' or 'stop' (got {mode!r})")
        self.mode = mode
        self.logger = logger
        self.main = main
        self.last_checkpoint = last_checkpoint
        self.skipped = 0          # steps skipped in this process's run
        self.consecutive = 0

    def check(self, step: int, loss: float, grads_finite: bool = True) -> bool:
        """Whether step ``step`` (1-based: the step it would complete) must be skipped. Raises
        :class:`NonFiniteError` when the run must stop."""
        if math.isfinite(loss) and grads_finite:
            self.consecutive = 0
            return False
        what = (f"the training loss is {loss}" if not math.isfinite(loss)
                else f"the gradients are not finite (loss {loss:.4f})")
        self.skipped += 1
        self.consecutive += 1
        stop = self.mode == "stop" or self.consecutive > MAX_CONSECUTIVE_SKIPS
        if self.logger is not None:
            self.logger.log("nonfinite", step, loss=str(loss), grads_finite=bool(grads_finite),
                            action="stop" if stop else "skip", skipped=self.skipped, consecutive=self.consecutive)
        last = self.last_checkpoint() if self.last_checkpoint is not None else None
        resume_from = f"; a resume restarts from {last}" if last else "; no checkpoint was written yet"
        if self.mode == "stop":
            raise NonFiniteError(f"step {step}: {what}; stopped before the optimizer step (train.on_nonfinite=stop), "
                                 f"so nothing non-finite was trained on or saved{resume_from}. Lower train.lr, or set "
                                 "train.on_nonfinite=skip to skip such steps")
        if stop:
            raise NonFiniteError(f"step {step}: {what}, the {self.consecutive}th non-finite step in a row "
                                 f"(train.on_nonfinite=skip stops after {MAX_CONSECUTIVE_SKIPS}); nothing non-finite "
                                 f"was trained on or saved{resume_from}. Lower train.lr or check the data")
        if self.main:
            log.warning("megamix: step %d: %s; step skipped (no optimizer step, no mixing update); %d skipped so far",
                        step, what, self.skipped)
        return True


__all__ = ["NonFiniteGuard", "NonFiniteError", "MAX_CONSECUTIVE_SKIPS"]

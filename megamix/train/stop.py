"""Stopping a run cleanly on request (a signal from the scheduler, e.g. SLURM's ``--signal=B:USR1@120``).

The entry point passes the loop a callable ``stop_requested() -> bool`` (set by its signal handler). At
every step boundary the loop asks it (together with the step's loss, in one all-reduce) and
:func:`check_stop` acts on the answer; if any rank said yes, every rank makes sure the
checkpoint of that step exists (saving it, collectively, unless the step just saved it) and raises
:class:`StopRequested`, which the entry point reports. Resuming from ``train.out_dir`` continues exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megamix.train.checkpoint import tag_for


class StopRequested(Exception):
    """The run stopped at a step boundary on request; checkpoint ``checkpoint`` (step ``step``) is complete."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped on request after step {step}; checkpoint {checkpoint} is saved: run the same "
                         "command to resume")
        self.step = step
        self.checkpoint = checkpoint


def check_stop(stop_any: bool, done: int, backend: Any, ckpt: Any, mixer: Any, cfg: Any, last: bool = False) -> None:
    """Called by the loop after step ``done``'s checkpoint decision. ``stop_any``: whether a stop was requested on
    any rank, already agreed by every rank (the loop reads it with the step's loss in one all-reduce,
    :meth:`megamix.train.backend.Backend.step_report`), so every rank stops at the same step. After the ``last``
    step the run ends normally anyway."""
    if not stop_any or last:
        return
    tag = tag_for(done)
    saved = 1.0 if ckpt.latest_tag() == tag else 0.0
    if backend.mean(saved) < 1.0:   # not every rank sees this step's checkpoint: save it (collectively)
        ckpt.save(done, backend, mixer, cfg)
    raise StopRequested(done, ckpt.root / tag)


__all__ = ["StopRequested", "check_stop"]

"""Stopping a run cleanly on request (a signal from the scheduler, e.g. SLURM's ``--signal=B:USR1@120``).

The entry point passes the loop a callable ``stop_requested() -> bool`` (set by its signal handler). At
every step boundary :func:`check_stop` asks it; if any rank says yes, every rank makes sure the
checkpoint of that step exists (saving it, collectively, unless the step just saved it) and raises
:class:`StopRequested`, which the entry point reports. Resuming from ``train.out_dir`` continues exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megamix.train.checkpoint import tag_for


class StopRequested(Exception):
    """The run stopped at a step boundary on request; checkpoint ``checkpoint`` (step ``step``) is complete."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped on request after step {step}; checkpoint {checkpoint} is saved: run the same "
                         "command to resume")
        self.step = step
        self.checkpoint = checkpoint


def check_stop(stop_requested: Callable[[], bool] | None, done: int, backend: Any, ckpt: Any, mixer: Any,
               cfg: Any, last: bool = False) -> None:
    """Called by the loop after step ``done``'s checkpoint decision (collective when ``world_size > 1``:
    one scalar all-reduce per step, so every rank stops at the same step). After the ``last`` step the run
    ends normally anyway."""
    if stop_requested is None or last:
        return
    flag = 1.0 if stop_requested() else 0.0
    if backend.mean(flag) <= 0.0:
        return
    tag = tag_for(done)
    saved = 1.0 if ckpt.latest_tag() == tag else 0.0
    if backend.mean(saved) < 1.0:   # not every rank sees this step's checkpoint: save it (collectively)
        ckpt.save(done, backend, mixer, cfg)
    raise StopRequested(done, ckpt.root / tag)


__all__ = ["StopRequested", "check_stop"]

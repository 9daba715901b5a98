"""What the training loop prints while it runs (rank 0): a tqdm bar on a terminal, plain log lines otherwise.

On a cluster stdout/stderr go to files, where a progress bar becomes one endless line of ``\\r`` fragments.
So when stdout or stderr is not a terminal (or the bar is turned off with ``--no-progress``), every
``train.log_every`` steps one line is printed and flushed::

    train[ddp x2] step 40/200 (20%) | loss 3.4127 | 5,310 tok/s | lr 2.91e-03 | weights: code_python 0.412, legal 0.224, manpages 0.201 .. changelogs 0.163 (eff. 3.7 of 4)

``eff.`` is the effective number of domains, ``exp(entropy)`` of the weights.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Iterator


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def weights_summary(weights: dict[str, float], top: int = 3) -> str:
    """The ``top`` largest weights, the smallest one and the effective number of domains."""
    items = sorted(weights.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k} {v:.3f}" for k, v in items[:top])
    if len(items) > top:
        shown += f" .. {items[-1][0]} {items[-1][1]:.3f}"
    ent = -sum(v * math.log(v) for _, v in items if v > 0)
    return f"{shown} (eff. {math.exp(ent):.1f} of {len(items)})"


class StepReporter:
    """Iterate over the steps of a run and report progress.

    Args:
        label: the run's label (``Backend.progress_label``).
        start, end: the steps this call runs (``range(start, end)``); ``total`` is ``train.steps``.
        bar: show a tqdm bar if stdout and stderr are terminals.
        lines: print plain log lines when no bar is shown (rank 0 with output wanted).
        stream: where lines go (default ``sys.stdout``).
    """

    def __init__(self, label: str, start: int, end: int, total: int, *, bar: bool, lines: bool, stream=None):
        self.label, self.start, self.end, self.total = label, start, end, total
        self.stream = stream if stream is not None else sys.stdout
        self._bar = None
        if bar and _isatty(sys.stdout) and _isatty(sys.stderr):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=start, desc=label)
        self.lines = lines and self._bar is None
        self._t0 = time.time()

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.end):
            yield step
            if self._bar is not None:
                self._bar.update(1)

    def log(self, step: int, *, loss: float, tokens_per_second: float, lr: float, weights: dict[str, float]) -> None:
        """Called every ``train.log_every`` steps (and at the last step)."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}")
        if not self.lines:
            return
        pct = 100.0 * step / max(self.total, 1)
        print(f"{self.label} step {step}/{self.total} ({pct:.0f}%) | loss {loss:.4f} | {tokens_per_second:,.0f} tok/s "
              f"| lr {lr:.2e} | weights: {weights_summary(weights)}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message between progress updates (evaluation results)."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["StepReporter", "weights_summary"]

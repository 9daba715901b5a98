"""Test-only launcher for the kill/resume tests (tests/test_train_torture.py): a crash at a named point of a
checkpoint save, in a real ``megamix train`` process.

``python tests/killpoint.py train --config ...`` (or ``torchrun ... tests/killpoint.py train ...``: every worker
runs it) runs the real CLI (:func:`megamix.cli.main`) with one change: ``train`` gets a checkpoint hook
(``train(checkpoint_hook=...)``, which :class:`megamix.train.checkpoint.Checkpoints` calls at each point of
:data:`~megamix.train.checkpoint.PHASES`) that SIGKILLs the process at the points ``MEGAMIX_TEST_KILL_AT`` names:
``PHASE@STEP`` (every rank) or ``PHASE@STEP@RANK``, comma-separated, e.g. ``model_saved@4@1`` kills rank 1 after
the model/engine files of step 4 and before megamix's side files. Without the variable it is the plain CLI.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

KILL_ENV = "MEGAMIX_TEST_KILL_AT"


def kill_hook(spec: str) -> Callable[[str, int, int], None]:
    """The checkpoint hook for a ``MEGAMIX_TEST_KILL_AT`` value: SIGKILL this process at the named points."""
    from megamix.train.checkpoint import PHASES

    points = set()
    for item in spec.split(","):
        parts = item.strip().split("@")
        if len(parts) not in (2, 3) or parts[0] not in PHASES or not all(x.isdigit() for x in parts[1:]):
            raise SystemExit(f"{KILL_ENV}={spec!r}: expected PHASE@STEP[@RANK] with PHASE one of {', '.join(PHASES)}")
        points.add((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))

    def hook(phase: str, step: int, rank: int) -> None:
        if (phase, step, rank) in points or (phase, step, None) in points:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> int:
    spec = os.environ.get(KILL_ENV)
    if spec:
        import megamix.train.loop as loop   # `megamix train` looks `train` up here when it runs

        hook, real = kill_hook(spec), loop.train

        def train(*args, **kwargs):
            return real(*args, checkpoint_hook=hook, **kwargs)

        loop.train = train
    from megamix.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Run a test's ranks as real processes: ``spawn(worker, args, nprocs)`` calls ``worker(rank, *args)`` in each.

Why not ``torch.multiprocessing.spawn``: a rank that returns normally then goes through interpreter
finalization, and a gloo process group still alive there (DeepSpeed's, or any group whose Python objects outlive
``destroy_process_group``) now and then aborts the process with "terminate called without an active
exception" (SIGABRT): CI runs 26 and a fresh-clone run on 2026-12-07 each lost one test to it, after the test's
work had finished and passed. Here a rank that returns flushes its output and leaves with ``os._exit(0)``,
skipping finalization; a rank that raises prints its traceback and leaves with ``os._exit(1)``. The parent
joins every rank (none is killed because another failed, so each one's error is printed) and fails the test
naming each rank that did not exit 0, with its exit code or signal.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import traceback

import torch.multiprocessing as mp

#: seconds to wait for each rank before killing it (a hung collective fails the test instead of the suite)
JOIN_TIMEOUT = 900


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT / a tcp:// init)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, args: tuple) -> None:
    code = 0
    try:
        fn(rank, *args)
    except BaseException:  # noqa: BLE001 - the parent sees the exit code; the traceback goes to stderr
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _how(code: int | None) -> str:
    if code is None:
        return f"still running after {JOIN_TIMEOUT} s (killed)"
    if code < 0:
        return f"died by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def spawn(fn, args: tuple = (), nprocs: int = 2, timeout: float = JOIN_TIMEOUT) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; raises AssertionError if any rank did not exit 0."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, fn, args)) for r in range(nprocs)]
    for p in procs:
        p.start()
    codes = []
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    bad = [f"rank {r} {_how(c)}" for r, c in enumerate(codes) if c != 0]
    assert not bad, f"{fn.__name__}: " + "; ".join(bad) + " (each rank's traceback is in the captured stderr)"

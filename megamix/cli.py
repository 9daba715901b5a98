"""The ``megamix`` command line. Each subcommand lives in ``megamix/commands/<name>.py`` and exposes
``register(subparsers)``; this file only wires them together."""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

# module name under megamix.commands -> registered lazily so `megamix --help` stays fast
COMMAND_MODULES = ["config", "data", "train", "mix", "regroup", "d2v", "bench", "report", "eval"]
LOG_LEVELS = ("debug", "info", "warning", "error")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit code 2) that points at the command's ``--help``.

    Subcommand parsers inherit it (``add_subparsers`` builds them with the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="megamix",
        description="Online data mixing for LLM pretraining (R&B, DoGraph, Domain2Vec) with fused "
                    "Triton gradient-projection kernels.")
    parser.add_argument("--version", action="version", version=_version())
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="Which of megamix's log messages reach stderr (default: info; in multi-rank runs only "
                            "rank 0 prints info, every rank prints warnings). Give it before the command: "
                            "`megamix --log-level warning train ...`.")
    noise.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                       help="Same as --log-level debug.")
    noise.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning",
                       help="Same as --log-level warning: only warnings and errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"megamix.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"megamix.commands.{name}":
                continue  # command not present in this build
            raise
        mod.register(sub)
    return parser


def _version() -> str:
    from megamix import __version__
    return f"megamix {__version__}"


# OSError numbers that are the user's to fix (a path, a full disk); anything else keeps its traceback
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device holding {f}: free space there, or point the output "
                  "(train.out_dir, --out, --data-dir) at another disk",
    errno.EDQUOT: "disk quota exceeded writing {f}: free space in your quota, or point the output "
                  "(train.out_dir, --out, --data-dir) at another disk",
    errno.EROFS: "{f} is on a read-only file system: point the output (train.out_dir, --out, --data-dir) "
                 "at a writable place",
    errno.EACCES: "permission denied on {f}: fix its permissions or choose another path",
    errno.EPERM: "operation not permitted on {f}: fix its permissions or choose another path",
    errno.ENOENT: "{f} does not exist: check the path",
    errno.EISDIR: "{f} is a directory where a file is expected: pass the file's path",
    errno.ENOTDIR: "{f}: part of this path is a file where a directory is expected: pass a directory",
    errno.EEXIST: "{f} already exists and is in the way: remove it or choose another path",
}


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError the user can fix (missing path, directory vs file, disk full, permissions),
    naming the path; None for anything else."""
    if e.errno in _OS_HINTS:
        f = e.filename if e.filename is not None else "the output"
        if e.filename2 is not None:
            f = f"{e.filename} -> {e.filename2}"
        return _OS_HINTS[e.errno].format(f=f)
    if e.errno is None and isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and str(e):
        return str(e)  # raised by megamix with its own message
    return None


def fail(message: str) -> int:
    """Print ``megamix: error: <message>`` as one line on stderr; return the exit code 2."""
    print("megamix: error: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------- one error line per launch
#: a rank other than 0 waits this long for rank 0's report before printing its error itself
REPORT_WAIT_S = 3.0
#: rank 0 stays this long after printing, so that ranks failing a moment later read its report and exit by
#: themselves before the launcher stops them (torchrun stops every rank once one has exited)
REPORT_LINGER_S = 1.0
#: a report written this long before this command started belongs to an earlier launch
REPORT_SKEW_S = 5.0
#: reports older than this are deleted when a new one is written
REPORT_KEEP_S = 3600.0
REPORTS_DIR = ".megamix-errors"
_started = time.time()   # when this command started (main() resets it)
#: what tells one launch from the next: torchrun's run id and restart count, the srun job step, the rendezvous
_LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "SLURM_NTASKS")


def _launch_key() -> str:
    """The same on every rank of one launch, different for the next. torchrun's run id (a fresh uuid with
    --standalone) or the srun job step tell launches apart on every node; without either, the launcher that
    started this node's ranks (deepspeed, a shell) is their parent process, so the key is one node's."""
    env = os.environ
    parts = [f"{k}={env[k]}" for k in _LAUNCH_VARS if k in env]
    if env.get("TORCHELASTIC_RUN_ID", "none") in ("", "none") and not ("SLURM_JOB_ID" in env and
                                                                       "SLURM_STEP_ID" in env):
        parts.append(f"{socket.gethostname()}:{os.getppid()}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


class _Stopped(BaseException):
    """SIGTERM arrived while this process was reporting its error."""


@contextlib.contextmanager
def _sigterm_raises(exiting: bool):
    """Within the block a SIGTERM raises :class:`_Stopped`. Afterwards the previous handler is back, or with
    ``exiting`` (the process ends next) SIGTERM is ignored, so that a launcher stopping the job while the
    interpreter shuts down (a second or more with torch loaded) leaves the exit code 2. Main thread only."""
    def stop(signum, frame):
        raise _Stopped()
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:   # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if exiting else old)


class _Reports:
    """The errors of one launch as files in a folder the ranks share (see :func:`fail_once`): ``<key>.rank0``
    holds rank 0's message; ``<key>.<digest of a message>`` marks a message another rank has printed."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{self.key}.{name}"

    def _record(self, message: str) -> bytes:
        return json.dumps({"time": time.time(), "rank": _env_rank(), "message": message}).encode()

    def _read(self, path: Path) -> dict | None:
        try:
            rec = json.loads(path.read_text())
            return rec if isinstance(rec, dict) and isinstance(rec.get("time"), (int, float)) else None
        except (OSError, ValueError):
            return None

    def _this_launch(self, rec: dict | None) -> bool:
        return rec is not None and rec["time"] >= _started - REPORT_SKEW_S

    def _prune(self) -> None:
        cutoff = time.time() - REPORT_KEEP_S
        with contextlib.suppress(OSError):
            for p in self.folder.iterdir():
                with contextlib.suppress(OSError):
                    if p.stat().st_mtime < cutoff:
                        p.unlink()

    def publish_rank0(self, message: str) -> None:
        """Rank 0: write its message (a rename: the others read all of it or nothing)."""
        self._prune()
        tmp = self._path(f"{os.getpid()}.tmp")
        tmp.write_bytes(self._record(message))
        os.replace(tmp, self._path("rank0"))

    def rank0(self) -> str | None:
        """Rank 0's message, once rank 0 of this launch has written it."""
        rec = self._read(self._path("rank0"))
        return str(rec.get("message")) if self._this_launch(rec) else None

    def claim(self, message: str) -> bool:
        """Another rank: True when it is the first to report ``message`` (an atomic link, refused when the
        file exists, so exactly one rank wins)."""
        self._prune()
        path = self._path(hashlib.sha1(message.encode()).hexdigest()[:16])
        tmp = self._path(f"{os.getpid()}.tmp")
        tmp.write_bytes(self._record(message))
        try:
            for _ in range(2):
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    rec = self._read(path)
                    if rec is None or self._this_launch(rec):   # unreadable: being written by another rank
                        return False
                    path.unlink(missing_ok=True)                # an earlier launch's
            return False
        finally:
            tmp.unlink(missing_ok=True)


def _reports(shared_dir: str | None) -> _Reports:
    """The reports of this launch in ``<shared_dir>/.megamix-errors``, or when that cannot be made in this
    node's temporary folder; raises OSError when neither can."""
    key = _launch_key()
    if shared_dir:
        with contextlib.suppress(OSError):
            return _Reports(Path(shared_dir) / REPORTS_DIR, key)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return _Reports(Path(tempfile.gettempdir()) / f"megamix-errors-{uid}", key)


def _should_print(text: str, shared_dir: str | None, rank: int) -> bool:
    """Rank 0: always (after writing its message for the others). Another rank: not when rank 0 has the same
    message, nor when another rank printed it already; it waits up to REPORT_WAIT_S for rank 0's."""
    try:
        reports = _reports(shared_dir)
        if rank == 0:
            reports.publish_rank0(text)
            return True
        deadline = time.monotonic() + REPORT_WAIT_S
        while (seen := reports.rank0()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen != text and reports.claim(text)
    except OSError:   # no folder to compare in: print rather than lose the message
        return True


def fail_once(message: str, shared_dir: str | None = None, *, agreed: bool = False, exiting: bool = False) -> int:
    """:func:`fail` once per launch instead of once per rank; returns the exit code 2 on every rank.

    One process (WORLD_SIZE/SLURM_NTASKS unset or 1): it prints. ``agreed``: every rank raised this same error
    (a :class:`megamix.comm.RankFailure`, agreed through the process group): rank 0 prints it, the others stay
    silent. Otherwise this rank raised the error on its own, perhaps before any process group exists, so the
    ranks compare messages through files in ``shared_dir`` (a folder every rank sees; ``megamix train`` gives
    ``train.out_dir``), or in this node's temporary folder when there is none or it cannot be written: rank 0
    writes its message and prints it; another rank waits up to ``REPORT_WAIT_S`` for it and stays silent when it
    has the same message, else prints its own unless another rank has printed that one. No collective and a
    bounded wait: it cannot hang, and a rank that cannot tell prints. Rank 0 then stays ``REPORT_LINGER_S``.
    A SIGTERM from the launcher meanwhile ends the wait with exit code 2 (printing first if nothing was printed);
    ``exiting`` (the command line's own process, which ends next) ignores SIGTERM from then on, for the same
    exit code.
    """
    text = " ".join(str(message).split())
    rank, world = _env_rank(), _env_world()
    if world <= 1 or not 0 <= rank < world:
        return fail(text)
    printed = False
    try:
        with _sigterm_raises(exiting):
            mine = (rank == 0) if agreed else _should_print(text, shared_dir, rank)
            if mine:
                fail(text)
                printed = True
            if rank == 0 and not agreed:
                time.sleep(REPORT_LINGER_S)
    except _Stopped:
        if not printed and not agreed:
            fail(text)
    return 2


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record arrives (so it follows a redirection
    made after setup, as the interpreter's last-resort handler does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _env_int(names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` set in the environment, as an integer; ``default`` when unset or unreadable
    (``megamix train`` reports a bad value itself)."""
    for name in names:
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                return default
    return default


def _env_rank() -> int:
    """This process's rank as the launcher sets it (torchrun/deepspeed: RANK, srun: SLURM_PROCID); 0 when unset
    or unreadable."""
    return _env_int(("RANK", "SLURM_PROCID"), 0)


def _env_world() -> int:
    """The launch's number of processes (torchrun/deepspeed: WORLD_SIZE, srun: SLURM_NTASKS); 1 when unset or
    unreadable."""
    return _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)


@contextlib.contextmanager
def log_to_stderr(level: str = "info"):
    """For one command: the ``megamix`` logger (and its children) prints records at ``level`` and above on stderr,
    each as its plain message (they carry their own ``megamix:`` prefix). In a multi-rank run only rank 0 prints
    info/debug; warnings and errors print on every rank. Restores the logger afterwards, so calling
    :func:`main` in-process leaves no handler behind. Library code never configures logging; this is the one
    place that does."""
    logger = logging.getLogger("megamix")
    threshold = getattr(logging, level.upper())
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(threshold if _env_rank() == 0 else max(threshold, logging.WARNING))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(threshold)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def main(argv: list[str] | None = None) -> int:
    global _started
    _started = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    with log_to_stderr(args.log_level):
        return _run(args, exiting=argv is None)   # argv None: the command line (console script, python -m)


def _run(args, exiting: bool = False) -> int:
    """Run the chosen command; every error the user can fix becomes one line on stderr and exit code 2, printed
    once per launch when several ranks run it (:func:`fail_once`; a command may set ``args.shared_dir`` to a
    folder every rank sees, ``megamix train`` sets ``train.out_dir``). ``exiting``: the process ends with the
    returned code (the command line, not an in-process call)."""
    from megamix.configbase import MegamixError
    debug = os.environ.get("MEGAMIX_TRACEBACK", "") not in ("", "0")  # developers: keep the traceback
    try:
        rc = args.func(args)
    except MegamixError as e:   # ConfigError / DataError (inputs), RunError (non-finite loss, domain exhausted)
        if debug:
            raise
        comm = sys.modules.get("megamix.comm")   # a RankFailure: every rank of the group raised this one error
        agreed = comm is not None and isinstance(e, comm.RankFailure)
        return fail_once(str(e), getattr(args, "shared_dir", None), agreed=agreed, exiting=exiting)
    except OSError as e:
        msg = os_error_message(e)
        if msg is None or debug:
            raise
        return fail_once(msg, getattr(args, "shared_dir", None), exiting=exiting)
    except KeyboardInterrupt:
        print("megamix: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``megamix`` command line. Each subcommand lives in ``megamix/commands/<name>.py`` and exposes
``register(subparsers)``; this file only wires them together."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import sys

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


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record arrives (so it follows a redirection
    made after setup, as the interpreter's last-resort handler does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _env_rank() -> int:
    """This process's rank as the launcher sets it (torchrun/deepspeed: RANK, srun: SLURM_PROCID); 0 when unset
    or unreadable (``megamix train`` reports a bad value itself)."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                return 0
    return 0


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    with log_to_stderr(args.log_level):
        return _run(args)


def _run(args) -> int:
    """Run the chosen command; every error the user can fix becomes one line on stderr and exit code 2."""
    from megamix.configbase import MegamixError
    debug = os.environ.get("MEGAMIX_TRACEBACK", "") not in ("", "0")  # developers: keep the traceback
    try:
        rc = args.func(args)
    except MegamixError as e:   # ConfigError / DataError (inputs), RunError (non-finite loss, domain exhausted)
        if debug:
            raise
        return fail(str(e))
    except OSError as e:
        msg = os_error_message(e)
        if msg is None or debug:
            raise
        return fail(msg)
    except KeyboardInterrupt:
        print("megamix: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

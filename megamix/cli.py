"""The ``megamix`` command line. Each subcommand lives in ``megamix/commands/<name>.py`` and exposes
``register(subparsers)``; this file only wires them together."""
from __future__ import annotations

import argparse
import importlib
import sys

# module name under megamix.commands -> registered lazily so `megamix --help` stays fast
COMMAND_MODULES = ["config", "data", "train", "mix", "regroup", "d2v", "bench", "report", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamix",
        description="Online data mixing for LLM pretraining (R&B, DoGraph, Domain2Vec) with fused "
                    "Triton gradient-projection kernels.")
    parser.add_argument("--version", action="version", version=_version())
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from megamix.configbase import ConfigError
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"megamix: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megamix: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`megamix report RUN_DIR`: render a run's telemetry (metrics.jsonl) as PNG plots."""
from __future__ import annotations

from pathlib import Path

from megamix.configbase import ConfigError


def register(sub) -> None:
    p = sub.add_parser("report", help="Render PNG plots (losses, weights, Gram heatmap) of a training run.")
    p.add_argument("run_dir", help="A run's out_dir (holds metrics.jsonl).")
    p.set_defaults(func=run)


def run(args) -> int:
    from megamix.train.plots import plot_run_files

    rd = Path(args.run_dir)
    m = rd / "metrics.jsonl"
    if not rd.is_dir():
        what = "is a file" if rd.exists() else "does not exist"
        raise ConfigError(f"run directory {rd} {what}; pass a run's train.out_dir (the folder holding metrics.jsonl)")
    if not m.is_file():
        raise ConfigError(f"{m} not found: {rd} is not a run directory; pass a run's train.out_dir")
    for p in plot_run_files(rd, title=rd.name):
        print(p)
    return 0

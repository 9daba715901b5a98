"""`megamix report RUN_DIR`: render a run's telemetry (metrics.jsonl) as PNG plots."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="Render PNG plots (losses, weights, Gram heatmap) of a training run.")
    p.add_argument("run_dir", help="A run's out_dir (holds metrics.jsonl).")
    p.set_defaults(func=run)


def run(args) -> int:
    from megamix.train.plots import plot_run_files

    rd = Path(args.run_dir)
    m = rd / "metrics.jsonl"
    if not m.exists():
        print(f"megamix report: {m} not found (is {rd} a run directory?)")
        return 2
    for p in plot_run_files(rd, title=rd.name):
        print(p)
    return 0

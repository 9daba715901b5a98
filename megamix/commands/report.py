"""`megamix report RUN_DIR`: render a run's telemetry (metrics.jsonl) as PNG plots."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="Render PNG plots (losses, weights, Gram heatmap) of a training run.")
    p.add_argument("run_dir", help="A run's out_dir (holds metrics.jsonl).")
    p.set_defaults(func=run)


def gram_heatmap(metrics_path: Path, out_png: Path) -> Path | None:
    """Cosine-normalised domain Gram matrix of the last mixing round (None if the run never mixed)."""
    from megamix.strategies.plots import plot_gram
    from megamix.train.metrics import read_metrics

    mix = [r for r in read_metrics(metrics_path) if r["kind"] == "mixing" and r.get("gram")]
    if not mix:
        return None
    return plot_gram(mix[-1]["gram"], list(mix[-1]["counts"].keys()), out_png,
                     title=f"domain gradients, round ending at step {mix[-1]['step']}")


def run(args) -> int:
    from megamix.train.plots import plot_run

    rd = Path(args.run_dir)
    m = rd / "metrics.jsonl"
    if not m.exists():
        print(f"megamix report: {m} not found (is {rd} a run directory?)")
        return 2
    print(plot_run(m, rd / "curves.png", title=rd.name))
    g = gram_heatmap(m, rd / "gram.png")
    if g:
        print(g)
    return 0

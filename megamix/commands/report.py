"""`megamix report RUN_DIR`: render a run's telemetry (metrics.jsonl) as PNG plots."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="Render PNG plots (losses, weights, Gram heatmap) of a training run.")
    p.add_argument("run_dir", help="A run's out_dir (holds metrics.jsonl).")
    p.set_defaults(func=run)


def gram_heatmap(metrics_path: Path, out_png: Path) -> Path | None:
    """Cosine-normalised domain Gram matrix of the last mixing round (None if the run never mixed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megamix.train.metrics import read_metrics

    recs = read_metrics(metrics_path)
    mix = [r for r in recs if r["kind"] == "mixing" and r.get("gram")]
    if not mix:
        return None
    G = np.asarray(mix[-1]["gram"], dtype=float)
    names = list(mix[-1]["counts"].keys())
    dn = np.sqrt(np.clip(np.diag(G), 1e-30, None))
    C = G / np.outer(dn, dn)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(C, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"domain gradient cosine, round ending at step {mix[-1]['step']}")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


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

"""PNG plots of a run, rendered from its ``metrics.jsonl``: per-domain validation loss, training loss,
and the domain weights over time."""
from __future__ import annotations

from pathlib import Path

from megamix.train.metrics import read_metrics


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Three panels: per-domain validation loss, train loss, domain weights (stacked). Returns the path."""
    from megamix.plotting import pyplot, save_figure
    plt = pyplot()

    recs = read_metrics(metrics_path)
    evals = [r for r in recs if r["kind"] == "eval"]
    trains = [r for r in recs if r["kind"] == "train"]
    weights = [r for r in recs if r["kind"] == "weights"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.2), gridspec_kw={"width_ratios": [1.15, 1, 1]})

    ax = axes[0]
    if evals:
        domains = sorted(evals[-1]["valid_loss"].keys())
        cmap = plt.get_cmap("tab20")
        for i, d in enumerate(domains):
            xs = [r["step"] for r in evals if r["valid_loss"].get(d) is not None]
            ys = [r["valid_loss"][d] for r in evals if r["valid_loss"].get(d) is not None]
            ax.plot(xs, ys, marker="o", ms=3, label=d, color=cmap(i % 20))
        xs = [r["step"] for r in evals]
        ax.plot(xs, [r["valid_loss_avg"] for r in evals], "k--", lw=2, label="average")
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title("validation loss per domain")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")

    ax = axes[1]
    if trains:
        ax.plot([r["step"] for r in trains], [r["loss"] for r in trains], label="train loss")
        ax.legend()
    ax.set_title("training loss")
    ax.set_xlabel("step")

    ax = axes[2]
    if weights:
        names = list(weights[0]["weights"].keys())
        xs = [r["step"] for r in weights]
        ys = [[r["weights"][n] for r in weights] for n in names]
        if len(xs) == 1:  # a static run: show the mixture as a flat band up to the last step
            last = max([r["step"] for r in recs] + [1])
            xs = [xs[0], last]
            ys = [[y[0], y[0]] for y in ys]
        cmap = plt.get_cmap("tab20")
        ax.stackplot(xs, ys, labels=names, colors=[cmap(i % 20) for i in range(len(names))],
                     step="post")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("domain weights (sampling probability)")
    ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)

"""PNG plots of a run, rendered from its ``metrics.jsonl`` (the same files for every backend):

- ``curves.png`` (:func:`plot_run`), two rows of three panels: per-domain validation loss, training loss,
  trained tokens per domain (epochs in the legend); domain weights as lines, the weights' change since
  step 0 (percentage points, so that small moves show), and realised minus target share of the samples
  drawn so far (percentage points);
- ``gram.png`` (:func:`gram_heatmap`): the cosine-normalised domain Gram matrix of the last mixing round.

:func:`plot_run_files` writes both (the loop calls it at the end of a run, ``megamix report`` on demand).
"""
from __future__ import annotations

from pathlib import Path

from megamix.train.metrics import read_metrics

PANEL_TITLES = ("validation loss per domain", "training loss", "trained tokens per domain",
                "domain weights (sampling probability)", "weight change since step 0 (pp)",
                "realised - target share, cumulative (pp)")


def _weight_series(recs: list[dict]) -> tuple[list[str], list[int], list[list[float]]]:
    """Domain names, steps and per-domain weights, extended flat to the last logged step."""
    weights = [r for r in recs if r["kind"] == "weights"]
    if not weights:
        return [], [], []
    names = list(weights[0]["weights"].keys())
    xs = [r["step"] for r in weights]
    ys = [[r["weights"][n] for r in weights] for n in names]
    last = max([r["step"] for r in recs] + [1])
    if last > xs[-1]:
        xs.append(last)
        ys = [y + [y[-1]] for y in ys]
    return names, xs, ys


def run_figure(metrics_path: str | Path, title: str | None = None):
    """The ``curves.png`` figure (matplotlib ``Figure``; see the module docstring). Axes titles are
    :data:`PANEL_TITLES`."""
    from megamix.plotting import pyplot
    plt = pyplot()

    recs = read_metrics(metrics_path)
    evals = [r for r in recs if r["kind"] == "eval"]
    trains = [r for r in recs if r["kind"] == "train"]
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(2, 3, figsize=(20, 10))
    ax_v, ax_t, ax_tok, ax_w, ax_dw, ax_sh = axes.ravel()
    for ax, t in zip(axes.ravel(), PANEL_TITLES):
        ax.set_title(t)
        ax.set_xlabel("step")

    names, wx, wy = _weight_series(recs)
    domains = names or (sorted(evals[-1]["valid_loss"].keys()) if evals else [])
    color = {d: cmap(i % 20) for i, d in enumerate(domains)}

    if evals:
        for d in sorted(evals[-1]["valid_loss"].keys()):
            pts = [(r["step"], r["valid_loss"][d]) for r in evals if r["valid_loss"].get(d) is not None]
            ax_v.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=d,
                      color=color.get(d, None))
        ax_v.plot([r["step"] for r in evals], [r["valid_loss_avg"] for r in evals], "k--", lw=2, label="average")
        ax_v.legend(fontsize=7, ncol=2, loc="upper right")
    ax_v.set_ylabel("cross-entropy (nats/token)")

    if trains:
        ax_t.plot([r["step"] for r in trains], [r["loss"] for r in trains], label="train loss")
        ax_t.legend()

    mix = [r for r in trains if r.get("tokens")]
    if mix:
        xs = [r["step"] for r in mix]
        for d in domains:
            ep = mix[-1].get("epochs", {}).get(d)
            ax_tok.plot(xs, [r["tokens"].get(d, 0) for r in mix], color=color[d],
                        label=f"{d} ({ep:.3g} ep)" if ep is not None else d)
            ax_sh.plot(xs, [100 * (r["realised_share"][d] - r["target_share"][d]) for r in mix], color=color[d],
                       label=d)
        ax_tok.legend(fontsize=7, loc="upper left")
        ax_sh.axhline(0, color="k", lw=0.8)
    ax_tok.set_ylabel("tokens")
    ax_sh.set_ylabel("percentage points")

    if names:
        for n, y in zip(names, wy):
            ax_w.plot(wx, y, drawstyle="steps-post", color=color[n], label=n)
            ax_dw.plot(wx, [100 * (v - y[0]) for v in y], drawstyle="steps-post", color=color[n], label=n)
        ax_w.set_ylim(bottom=0)
        ax_w.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax_dw.axhline(0, color="k", lw=0.8)
    ax_dw.set_ylabel("percentage points")
    if title:
        fig.suptitle(title)
    return fig


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Write :func:`run_figure` to ``out_png``; returns the path."""
    from megamix.plotting import save_figure
    return save_figure(run_figure(metrics_path, title), out_png)


def gram_heatmap(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Cosine-normalised domain Gram matrix of the last mixing round (None if the run never mixed)."""
    from megamix.strategies.plots import plot_gram

    mix = [r for r in read_metrics(metrics_path) if r["kind"] == "mixing" and r.get("gram")]
    if not mix:
        return None
    return plot_gram(mix[-1]["gram"], list(mix[-1]["counts"].keys()), out_png,
                     title=f"domain gradients, round ending at step {mix[-1]['step']}")


def plot_run_files(run_dir: str | Path, title: str | None = None) -> list[Path]:
    """``curves.png`` and (when the run mixed) ``gram.png`` in ``run_dir`` from its ``metrics.jsonl``."""
    rd = Path(run_dir)
    out = [plot_run(rd / "metrics.jsonl", rd / "curves.png", title=title)]
    g = gram_heatmap(rd / "metrics.jsonl", rd / "gram.png")
    return out + ([g] if g is not None else [])

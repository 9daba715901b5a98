"""Telemetry plots (matplotlib, Agg backend, PNG): weights over time, a Gram/alignment heatmap and
cluster sizes. Every function returns the path it wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_weights", "plot_gram", "plot_cluster_sizes", "plot_strategy"]


from megamix.plotting import pyplot as _plt
from megamix.plotting import save_figure as _save


def plot_weights(history: Sequence[tuple[int, Sequence[float]]], domain_names: Sequence[str],
                 path: str | Path, title: str = "domain weights") -> Path:
    """Stacked area plot of weights over steps from ``[(step, weights), ...]``."""
    if not history:
        raise ValueError("plot_weights needs at least one (step, weights) entry")
    steps = np.array([s for s, _ in history], dtype=float)
    w = np.array([list(x) for _, x in history], dtype=float)
    if w.shape[1] != len(domain_names):
        raise ValueError(f"weights have {w.shape[1]} entries for {len(domain_names)} domains")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(steps) == 1:
        ax.bar(range(len(domain_names)), w[0])
        ax.set_xticks(range(len(domain_names)), domain_names, rotation=45, ha="right")
        ax.set_ylabel("weight")
    else:
        # piecewise constant: each weight holds until the next update; show the last one for a round
        steps = np.append(steps, steps[-1] + (steps[-1] - steps[-2]))
        w = np.vstack([w, w[-1:]])
        ax.stackplot(steps, w.T, labels=list(domain_names), step="post")
        ax.set_xlabel("step")
        ax.set_ylabel("weight (stacked)")
        ax.set_ylim(0, 1)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_gram(gram: np.ndarray, names: Sequence[str], path: str | Path, cosine: bool = True,
              title: str = "gradient alignment") -> Path:
    """Heatmap of a Gram matrix; with ``cosine`` it is normalised to cosine similarities."""
    g = np.asarray(gram, dtype=float)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] != len(names):
        raise ValueError(f"gram of shape {g.shape} does not match {len(names)} names")
    if cosine:
        d = np.sqrt(np.clip(np.diag(g), 0, None))
        denom = np.outer(d, d)
        g = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    lim = float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 1.0
    im = ax.imshow(g, cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1)
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{g[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title + (" (cosine)" if cosine else ""))
    return _save(fig, path)


def plot_cluster_sizes(sizes: Sequence[int], path: str | Path, names: Sequence[str] | None = None,
                       contingency: np.ndarray | None = None, row_names: Sequence[str] | None = None,
                       title: str = "cluster sizes") -> Path:
    """Bar chart of cluster sizes; with a ``contingency`` table ``[rows, clusters]`` the bars are stacked
    by row (e.g. original domain)."""
    sizes = np.asarray(sizes, dtype=float)
    names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(sizes) + 3), 4))
    x = np.arange(len(sizes))
    if contingency is not None:
        c = np.asarray(contingency, dtype=float)
        bottom = np.zeros(len(sizes))
        for r in range(c.shape[0]):
            ax.bar(x, c[r], bottom=bottom, label=(row_names[r] if row_names else str(r)))
            bottom += c[r]
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    else:
        ax.bar(x, sizes)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title(title)
    return _save(fig, path)


def plot_strategy(strategy, out_dir: str | Path, prefix: str = "mix",
                  history: Sequence[tuple[int, Sequence[float]]] | None = None) -> list[Path]:
    """All plots available for a strategy's last round, plus its weights over time when ``history``
    (``[(step, weights), ...]``, e.g. ``Mixer.weight_history``) is given; returns the written paths."""
    out = Path(out_dir)
    paths = []
    if history:
        paths.append(plot_weights(history, strategy.domain_names, out / f"{prefix}_weights.png",
                                  title=f"{strategy.name} weights"))
    info = strategy.last_info or {}
    if "gram" in info:
        paths.append(plot_gram(np.asarray(info["gram"]), strategy.domain_names,
                               out / f"{prefix}_gram.png", title="domain gradient alignment"))
    if "cluster_gram" in info:
        k = len(info["cluster_gram"])
        paths.append(plot_gram(np.asarray(info["cluster_gram"]), [f"c{i}" for i in range(k)],
                               out / f"{prefix}_cluster_gram.png", title="cluster gradient alignment"))
    if "cluster_sizes" in info:
        cont = np.asarray(info.get("contingency")).T if "contingency" in info else None
        paths.append(plot_cluster_sizes(info["cluster_sizes"], out / f"{prefix}_clusters.png",
                                        names=[f"c{i}" for i in range(len(info["cluster_sizes"]))],
                                        contingency=cont, row_names=strategy.domain_names,
                                        title="DoGraph clusters by domain"))
    return paths

"""Plots of domain vectors: a heatmap (datasets × meta-domains) and a 2-D map (PCA, plus t-SNE when
there are enough datasets). PNG files, matplotlib Agg backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_heatmap", "plot_map", "plot_vectors"]


from megamix.plotting import pyplot as _plt
from megamix.plotting import save_figure


def plot_heatmap(V: np.ndarray, row_names: list[str], col_names: list[str] | None, path: str | Path,
                 title: str = "Domain vectors over meta-domains") -> Path:
    """Heatmap of ``V [rows, n]`` (one dataset per row)."""
    plt = _plt()
    V = np.asarray(V)
    fig, ax = plt.subplots(figsize=(min(20, 3 + 0.25 * V.shape[1]), 1.5 + 0.35 * V.shape[0]))
    im = ax.imshow(V, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(row_names)), labels=row_names, fontsize=8)
    if col_names is not None and len(col_names) <= 80:
        ax.set_xticks(range(len(col_names)), labels=col_names, rotation=90, fontsize=6)
    ax.set_xlabel("meta-domain")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return save_figure(fig, path)


def plot_map(V: np.ndarray, names: list[str], path: str | Path, method: str = "pca",
             highlight: list[str] | None = None, seed: int = 0) -> Path:
    """2-D map of datasets by PCA or t-SNE of their domain vectors."""
    plt = _plt()
    V = np.asarray(V, np.float64)
    if len(V) < 2:
        raise ValueError("need at least 2 datasets to draw a map")
    if method == "pca":
        from sklearn.decomposition import PCA
        XY = PCA(n_components=2, random_state=seed).fit_transform(V) if V.shape[1] >= 2 else \
            np.c_[V[:, 0], np.zeros(len(V))]
    elif method == "tsne":
        from sklearn.manifold import TSNE
        XY = TSNE(n_components=2, perplexity=max(1.0, min(5.0, (len(V) - 1) / 3)), random_state=seed,
                  init="pca").fit_transform(V)
    else:
        raise ValueError(f"method must be pca or tsne (got {method!r})")
    fig, ax = plt.subplots(figsize=(6.5, 5))
    hl = set(highlight or [])
    for (x, y), nm in zip(XY, names):
        ax.scatter([x], [y], c="tab:red" if nm in hl else "tab:blue", s=40)
        ax.annotate(nm, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(f"Datasets by domain vector ({method.upper()})")
    return save_figure(fig, path)


def plot_vectors(vectors, out_dir: str | Path, seed: int = 0) -> list[Path]:
    """All plots for a :class:`megamix.domain2vec.vectorize.DomainVectors` into ``out_dir``."""
    out = Path(out_dir)
    rows = [np.asarray(vectors.V_train)]
    names = list(vectors.domains)
    if len(vectors.valid_domains):
        rows.append(vectors.V_valid)
        names += [f"valid:{d}" for d in vectors.valid_domains]
    if vectors.v_valid is not None:
        rows.append(vectors.v_valid[None])
        names.append("VALID(mix)")
    V = np.concatenate(rows)
    paths = [plot_heatmap(V, names, vectors.meta_names or None, out / "d2v_heatmap.png"),
             plot_map(V, names, out / "d2v_pca.png", "pca", highlight=["VALID(mix)"], seed=seed)]
    if len(V) >= 5:
        paths.append(plot_map(V, names, out / "d2v_tsne.png", "tsne", highlight=["VALID(mix)"], seed=seed))
    return paths

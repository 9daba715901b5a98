"""The Regroup report figure: silhouette per k, and the chosen clusters' sizes by original domain."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_regroup"]


def plot_regroup(report: dict, path: str | Path) -> Path:
    """Two panels (silhouette vs k; cluster sizes stacked by source domain) written as a PNG."""
    from megamix.plotting import pyplot, save_figure
    plt = pyplot()

    per_k = report["per_k"]
    ks = sorted(int(k) for k, v in per_k.items() if "silhouette" in v)
    sil = [per_k[str(k)]["silhouette"] for k in ks]
    clusters = report["clusters"]
    cont = report["contingency"]
    doms = sorted(cont)
    table = np.array([[cont[d].get(c, 0) for c in clusters] for d in doms], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ks, sil, marker="o")
    a1.axvline(report["best_k"], color="grey", ls="--", lw=1)
    a1.set_xlabel("k")
    a1.set_ylabel(f"silhouette (sample of {report['silhouette_sample']})")
    a1.set_title(f"k sweep: best k = {report['best_k']}")
    x = np.arange(len(clusters))
    bottom = np.zeros(len(clusters))
    for i, d in enumerate(doms):
        a2.bar(x, table[i], bottom=bottom, label=d)
        bottom += table[i]
    a2.set_xticks(x, clusters, rotation=45, ha="right", fontsize=8)
    a2.set_ylabel("documents")
    a2.set_title("clusters by original domain")
    a2.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return save_figure(fig, path)

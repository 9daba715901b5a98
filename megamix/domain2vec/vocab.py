"""Meta-domain vocabulary: embed a reference corpus, cluster each language group with streaming
k-means (MiniBatchKMeans.partial_fit) and store the centroids.

Artifacts written by :func:`build_vocab` into ``out_dir``:

- ``vocab.npz``: ``centroids [K, dim]`` (unit-normalised), ``groups [K]`` (group name per centroid)
- ``vocab.json``: metadata (embedder spec, groups and their k, cluster sizes, top sources per cluster,
  a sample passage per cluster)
- ``reference.npz``: ``embeddings [N, dim]``, ``labels [N]`` (meta-domain id), ``domains [N]``
  (the reference passages' corpus domains) so the classifier can train without re-embedding
- ``elbow.json`` / ``elbow.png``: inertia vs k (global and per group) with a suggested k (kneedle)
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megamix.configbase import ConfigError
from megamix.data.errors import DataError
from megamix.data.corpus import corpus_domains
from megamix.domain2vec.corpus import (Passage, detect_language, iter_passages, language_group,
                                       sample_passages)
from megamix.domain2vec._threads import blas_threads
from megamix.embed import Embedder, get_embedder

__all__ = ["MetaDomainVocab", "collect_reference", "build_vocab", "elbow_report", "kneedle",
           "allocate_k", "embedder_from_spec"]


@dataclass
class MetaDomainVocab:
    """Centroids of the meta-domains plus metadata. ``assign`` labels embeddings by nearest centroid
    within their language group (or globally when no group is given)."""

    centroids: np.ndarray
    groups: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.centroids.shape[0])

    def names(self) -> list[str]:
        """Readable meta-domain names: ``<group>/<index within group>``."""
        cnt: Counter = Counter()
        out = []
        for g in self.groups:
            out.append(f"{g}/{cnt[g]}")
            cnt[g] += 1
        return out

    def assign(self, emb: np.ndarray, groups: list[str] | None = None) -> np.ndarray:
        """Meta-domain id of each embedding row (nearest centroid, restricted to its group)."""
        emb = np.asarray(emb, dtype=np.float32)
        sims = emb @ self.centroids.T
        if groups is not None:
            cg = np.asarray(self.groups)
            known = set(self.groups)
            for g in set(groups):
                rows = np.array([i for i, x in enumerate(groups) if x == g])
                if g in known:
                    sims[np.ix_(rows, np.where(cg != g)[0])] = -np.inf
        return sims.argmax(axis=1).astype(np.int64)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "vocab.npz", centroids=self.centroids.astype(np.float32),
                 groups=np.asarray(self.groups))
        (out / "vocab.json").write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, out_dir: str | Path) -> "MetaDomainVocab":
        out = Path(out_dir)
        if not (out / "vocab.npz").is_file():
            raise FileNotFoundError(f"{out}/vocab.npz not found: run `megamix d2v vocab` first")
        z = np.load(out / "vocab.npz")
        meta = json.loads((out / "vocab.json").read_text()) if (out / "vocab.json").is_file() else {}
        return cls(z["centroids"], [str(g) for g in z["groups"]], meta)


def embedder_from_spec(spec: dict) -> Embedder:
    """Rebuild the embedder recorded in a vocab/classifier spec ``{"name", "max_tokens", "kwargs"}``."""
    return get_embedder(spec["name"], device=spec.get("device", "cpu"),
                        max_tokens=int(spec.get("max_tokens", 256)), **spec.get("kwargs", {}))


def collect_reference(data_dir: str | Path, domains: list[str] | None = None, split: str = "train",
                      docs_per_domain: int = 500, max_chars: int = 1024, seed: int = 0,
                      progress: bool = False) -> list[Passage]:
    """A seeded sample of ``docs_per_domain`` passages from each domain of the corpus."""
    domains = domains or corpus_domains(data_dir, split, required=True)
    out: list[Passage] = []
    it = domains
    if progress:
        from tqdm import tqdm
        it = tqdm(domains, desc="read reference corpus", unit="domain")
    for i, d in enumerate(it):
        ps = sample_passages(iter_passages(data_dir, d, split, max_chars=max_chars), docs_per_domain,
                             seed=seed * 1000003 + i)
        if not ps:
            raise DataError(f"domain {d!r} has no passages in {Path(data_dir) / 'corpus' / d / (split + '.jsonl')}; "
                            "add documents or leave it out with --domains")
        out.extend(ps)
    return out


def allocate_k(group_counts: dict[str, int], k_total: int) -> dict[str, int]:
    """Split ``k_total`` clusters over groups in proportion to their sizes (at least 1 each, at most
    the group's size). Deterministic (largest remainder, ties by name)."""
    if k_total < len(group_counts):
        raise ConfigError(f"k={k_total} is smaller than the number of language groups "
                          f"({len(group_counts)}: {sorted(group_counts)}); raise k (--k) or use group_by=none "
                          "(--group-by none)")
    total = sum(group_counts.values())
    raw = {g: k_total * c / total for g, c in group_counts.items()}
    k = {g: max(1, int(np.floor(v))) for g, v in raw.items()}
    for g in k:
        k[g] = min(k[g], group_counts[g])
    while sum(k.values()) < k_total:
        room = [g for g in k if k[g] < group_counts[g]]
        if not room:
            break
        g = max(sorted(room), key=lambda x: raw[x] - k[x])
        k[g] += 1
    while sum(k.values()) > k_total:
        g = max(sorted(k), key=lambda x: (k[x] - raw[x], k[x]))
        if k[g] <= 1:
            break
        k[g] -= 1
    return k


def _stream_kmeans(emb_batches, k_by_group: dict[str, int], batch_size: int, seed: int):
    """partial_fit one MiniBatchKMeans per group over a stream of (emb, groups) batches."""
    from sklearn.cluster import MiniBatchKMeans

    models = {g: MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3)
              for g, k in k_by_group.items()}
    buffers: dict[str, list[np.ndarray]] = defaultdict(list)
    fitted: set[str] = set()

    def flush(g: str, force: bool) -> None:
        if not buffers[g]:
            return
        x = np.concatenate(buffers[g])
        need = max(models[g].n_clusters, 1) if g in fitted else max(3 * models[g].n_clusters, batch_size)
        if len(x) >= need or (force and len(x) >= models[g].n_clusters):
            with blas_threads(1):  # the embedder (torch) keeps its own threads
                models[g].partial_fit(x)
            fitted.add(g)
            buffers[g] = []
        elif force and g in fitted:
            with blas_threads(1):
                models[g].partial_fit(np.concatenate([x] * int(np.ceil(models[g].n_clusters / len(x)))))
            buffers[g] = []

    for emb, groups in emb_batches:
        ga = np.asarray(groups)
        for g in k_by_group:
            sel = emb[ga == g]
            if len(sel):
                buffers[g].append(sel)
                flush(g, force=False)
    for g in k_by_group:
        flush(g, force=True)
    return models


def kneedle(ks: list[int], inertias: list[float]) -> int:
    """The elbow: the k whose normalised inertia lies furthest below the chord from first to last."""
    if len(ks) < 3:
        return int(ks[-1])
    x = (np.asarray(ks, float) - ks[0]) / max(1e-12, ks[-1] - ks[0])
    y = np.asarray(inertias, float)
    y = (y - y.min()) / max(1e-12, y.max() - y.min())
    chord = 1.0 - x
    return int(ks[int(np.argmax(chord - y))])


def elbow_report(emb: np.ndarray, groups: list[str], ks: list[int], seed: int = 0,
                 max_points: int = 20000, out_dir: str | Path | None = None,
                 progress: bool = False) -> dict:
    """Inertia of k-means for each k in ``ks``, globally and per group; suggested k by kneedle.

    Writes ``elbow.json`` and ``elbow.png`` into ``out_dir`` when given.
    """
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    emb = np.asarray(emb, np.float32)
    ga = np.asarray(groups)
    sets = {"global": np.arange(len(emb))}
    for g in sorted(set(groups)):
        sets[g] = np.where(ga == g)[0]
    report: dict = {"ks": {}, "inertia": {}, "suggested_k": {}}
    items = list(sets.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="elbow", unit="group")
    for name, idx in items:
        if len(idx) > max_points:
            idx = np.sort(rng.choice(idx, size=max_points, replace=False))
        x = emb[idx]
        kk = sorted({int(k) for k in ks if 1 <= k <= len(x)})
        if not kk:
            continue
        inert = []
        for k in kk:
            with blas_threads(1):
                km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3,
                                     batch_size=min(1024, max(k, len(x)))).fit(x)
            inert.append(float(km.inertia_))
        report["ks"][name] = kk
        report["inertia"][name] = inert
        report["suggested_k"][name] = kneedle(kk, inert)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "elbow.json").write_text(json.dumps(report, indent=2))
        _plot_elbow(report, out / "elbow.png")
    return report


def _plot_elbow(report: dict, path: Path) -> None:
    from megamix.plotting import pyplot, save_figure
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ks in report["ks"].items():
        y = np.asarray(report["inertia"][name])
        y = y / max(1e-12, y[0])
        ax.plot(ks, y, marker="o", lw=2.5 if name == "global" else 1, label=name)
        if name == "global":
            ax.axvline(report["suggested_k"][name], ls="--", c="gray")
    ax.set_xlabel("k (number of meta-domains)")
    ax.set_ylabel("inertia / inertia at smallest k")
    ax.set_title("Meta-domain vocabulary: elbow (dashed = suggested global k)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def build_vocab(data_dir: str | Path, out_dir: str | Path, *, k: int = 32,
                embedder: Embedder | None = None, embedder_spec: dict | None = None,
                domains: list[str] | None = None, docs_per_domain: int = 500, max_chars: int = 1024,
                group_by: str = "language", k_by_group: dict[str, int] | None = None,
                elbow_ks: list[int] | None = None, batch_size: int = 256, seed: int = 0,
                progress: bool = True, passages: list[Passage] | None = None) -> MetaDomainVocab:
    """Build the meta-domain vocabulary from the reference corpus and save it into ``out_dir``.

    ``k`` clusters are split across language groups in proportion to their passage counts unless
    ``k_by_group`` fixes them. Embedding streams in batches of ``batch_size``; each batch is fed to
    the groups' ``MiniBatchKMeans.partial_fit``. Embeddings are written to ``reference.npz``.
    """
    spec = dict(embedder_spec or {"name": "minilm", "max_tokens": 256, "kwargs": {}})
    if embedder is None:
        embedder = embedder_from_spec(spec)
    spec["key"] = embedder.key
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if passages is None:
        passages = collect_reference(data_dir, domains, docs_per_domain=docs_per_domain,
                                     max_chars=max_chars, seed=seed, progress=progress)
    if not passages:
        raise DataError(f"the reference corpus is empty (no passages under {Path(data_dir) / 'corpus'}); build "
                        "the corpus first (`megamix data build`)")
    langs = [detect_language(p.text, p.source) for p in passages]
    groups = [language_group(lang, group_by) for lang in langs]
    counts = Counter(groups)
    if k_by_group is None:
        k_by_group = allocate_k(dict(counts), k)
    else:
        missing = set(counts) - set(k_by_group)
        if missing:
            raise ValueError(f"k_by_group lacks groups {sorted(missing)}")
        k_by_group = {g: min(int(v), counts[g]) for g, v in k_by_group.items() if g in counts}

    emb = np.zeros((len(passages), embedder.dim), dtype=np.float32)

    def batches():
        starts = range(0, len(passages), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc=f"embed+kmeans ({embedder.key.split(':')[0]})", unit="batch")
        for s in starts:
            e = embedder.encode([p.text for p in passages[s: s + batch_size]], batch_size=min(64, batch_size))
            emb[s: s + len(e)] = e
            yield e, groups[s: s + batch_size]

    models = _stream_kmeans(batches(), k_by_group, batch_size=batch_size, seed=seed)
    cents, cgroups = [], []
    for g in sorted(models):
        c = models[g].cluster_centers_.astype(np.float32)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        cents.append(c)
        cgroups += [g] * len(c)
    vocab = MetaDomainVocab(np.concatenate(cents), cgroups)
    labels = vocab.assign(emb, groups)
    names = vocab.names()
    clusters = []
    for j in range(vocab.n):
        members = np.where(labels == j)[0]
        src = Counter(passages[i].domain for i in members).most_common(3)
        clusters.append({"id": j, "name": names[j], "group": cgroups[j], "size": int(len(members)),
                         "top_domains": src,
                         "example": passages[int(members[0])].text[:200] if len(members) else ""})
    vocab.meta = {"embedder": spec, "k": vocab.n, "group_by": group_by, "k_by_group": k_by_group,
                  "group_counts": dict(counts), "n_passages": len(passages), "seed": seed,
                  "max_chars": max_chars, "docs_per_domain": docs_per_domain,
                  "domains": sorted({p.domain for p in passages}), "clusters": clusters}
    vocab.save(out)
    np.savez(out / "reference.npz", embeddings=emb, labels=labels,
             domains=np.asarray([p.domain for p in passages]), groups=np.asarray(groups))
    if elbow_ks:
        vocab.meta["elbow"] = elbow_report(emb, groups, elbow_ks, seed=seed, out_dir=out,
                                           progress=progress)["suggested_k"]
        vocab.save(out)
    return vocab

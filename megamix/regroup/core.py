"""R&B *Regroup* (offline): embed documents, k-means with a k sweep scored by silhouette, and write
the clusters out as new domains ``cluster_00, cluster_01, ...``.

Scales past memory by streaming:

- documents are read from ``corpus/<domain>/{train,valid}.jsonl`` line by line; only
  ``(domain, split, line)`` references are kept in memory;
- embeddings are written in batches into a ``.npy`` memmap (``regroup/embeddings.npy``);
- k-means is ``sklearn.cluster.MiniBatchKMeans.partial_fit`` over shuffled batches read from the memmap
  (several epochs), and assignment is ``predict`` batch by batch;
- the silhouette score is computed on a seeded sample of at most ``silhouette_sample`` points;
- the regrouped corpus is written by streaming the source files once more.

Only training documents are used to fit k-means and score k; validation documents are assigned to
the nearest centroid and keep their split. Outputs under ``out_dir``:
``corpus/cluster_XX/{train,valid}.jsonl`` (``source`` is ``"<orig domain>:<orig source>"``),
``corpus/stats.json``, ``tokens/`` (via :func:`megamix.data.tokenize.tokenize_corpus`), and
``regroup/{embeddings.npy, mapping.jsonl, report.json, regroup.png}``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

__all__ = ["DocRef", "collect_refs", "iter_texts", "embed_to_memmap", "fit_minibatch_kmeans",
           "predict_memmap", "sweep_k", "write_regrouped", "regroup", "cluster_name"]

SPLITS = ("train", "valid")


def cluster_name(c: int) -> str:
    """``cluster_00``-style domain name."""
    return f"cluster_{c:02d}"


@dataclass(frozen=True)
class DocRef:
    """Where a document lives: ``corpus/<domain>/<split>.jsonl`` line ``line`` (0-based, non-empty lines)."""

    domain: str
    split: str
    line: int


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if raw.strip():
                yield json.loads(raw)


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for raw in f if raw.strip())


def collect_refs(data_dir: str | Path, domains: Sequence[str] | None = None,
                 max_docs: int | None = None) -> list[DocRef]:
    """References to the documents to regroup, in (domain, split, line) order.

    ``max_docs`` caps the number of **train** documents, split evenly across domains (the first
    documents of each); each domain's valid documents are capped at the same per-domain quota.
    """
    root = Path(data_dir) / "corpus"
    if not root.is_dir():
        raise FileNotFoundError(f"no corpus under {root}; run `megamix data build` first")
    avail = sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file())
    doms = list(domains) if domains else avail
    missing = [d for d in doms if d not in avail]
    if missing:
        raise FileNotFoundError(f"no corpus/<domain>/train.jsonl for {missing} under {root}")
    if not doms:
        raise FileNotFoundError(f"no domains under {root}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    quotas = [None] * len(doms)
    if max_docs is not None:
        base, rem = divmod(max_docs, len(doms))
        quotas = [base + (1 if i < rem else 0) for i in range(len(doms))]
    refs: list[DocRef] = []
    for dom, q in zip(doms, quotas):
        for split in SPLITS:
            n = _count_lines(root / dom / f"{split}.jsonl")
            if q is not None:
                n = min(n, q)
            refs.extend(DocRef(dom, split, i) for i in range(n))
    return refs


def iter_texts(data_dir: str | Path, refs: Sequence[DocRef]) -> Iterator[tuple[DocRef, dict]]:
    """Stream ``(ref, row)`` for ``refs`` (which must be grouped by file and in line order)."""
    root = Path(data_dir) / "corpus"
    i = 0
    while i < len(refs):
        dom, split = refs[i].domain, refs[i].split
        j = i
        while j < len(refs) and (refs[j].domain, refs[j].split) == (dom, split):
            j += 1
        wanted = {r.line: r for r in refs[i:j]}
        last = refs[j - 1].line
        for line, row in enumerate(_iter_jsonl(root / dom / f"{split}.jsonl")):
            if line in wanted:
                yield wanted[line], row
            if line >= last:
                break
        i = j


def embed_to_memmap(texts: Iterator[str], n: int, embedder, path: str | Path, *,
                    batch_size: int = 64, max_chars: int | None = 2000,
                    progress: bool = True) -> np.memmap:
    """Embed ``n`` texts in batches into a float32 ``.npy`` memmap ``[n, embedder.dim]``.

    ``max_chars`` truncates each text before embedding (the embedder truncates tokens as well).
    """
    if n < 1:
        raise ValueError("nothing to embed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, int(embedder.dim)))
    bar = tqdm(total=n, unit="doc", desc="regroup embed", file=sys.stderr, disable=not progress)
    pos = 0
    batch: list[str] = []

    def flush():
        nonlocal pos
        if batch:
            emb = np.asarray(embedder.encode(batch, batch_size=batch_size), dtype=np.float32)
            out[pos:pos + len(batch)] = emb
            pos += len(batch)
            bar.update(len(batch))
            batch.clear()

    for t in texts:
        if pos + len(batch) >= n:
            break
        batch.append(t[:max_chars] if max_chars else t)
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    if pos != n:
        raise RuntimeError(f"expected {n} texts to embed, got {pos}")
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def fit_minibatch_kmeans(emb: np.ndarray, rows: np.ndarray, k: int, *, seed: int = 0,
                         batch_size: int = 1024, epochs: int = 5, min_steps: int = 30,
                         init_sample: int = 20000, progress: bool = True):
    """``MiniBatchKMeans.partial_fit`` over shuffled batches of ``emb[rows]`` (a memmap is fine).

    Runs ``epochs`` passes, or more when needed to make at least ``min_steps`` partial_fit updates.

    Initial centres come from a full k-means (k-means++, 4 restarts) on a seeded sample of at most
    ``init_sample`` rows, so memory stays bounded; the streaming passes then refine them.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    rows = np.asarray(rows)
    if k < 2 or k > len(rows):
        raise ValueError(f"k={k} needs 2 <= k <= number of points ({len(rows)})")
    rng = np.random.default_rng(seed)
    bs = max(int(batch_size), 3 * k)
    # initial centres: full k-means (k-means++, several restarts) on a memory-bounded seeded sample
    init_rows = np.sort(rng.choice(rows, size=min(len(rows), max(init_sample, 3 * k)), replace=False))
    init = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(
        np.asarray(emb[init_rows], dtype=np.float32)).cluster_centers_
    km = MiniBatchKMeans(n_clusters=k, init=init, n_init=1, random_state=seed, batch_size=bs)
    per_epoch = math.ceil(len(rows) / bs)
    # small inputs fit in one batch: run enough passes for at least `min_steps` mini-batch updates
    epochs = max(int(epochs), math.ceil(min_steps / per_epoch))
    n_batches = epochs * per_epoch
    bar = tqdm(total=n_batches, unit="batch", desc=f"kmeans k={k}", file=sys.stderr,
               disable=not progress, leave=False)
    for _ in range(epochs):
        perm = rng.permutation(rows)
        for s in range(0, len(perm), bs):
            idx = np.sort(perm[s:s + bs])
            if len(idx) < k:  # a short tail batch cannot seed/refine k clusters on its own
                idx = np.sort(np.concatenate([idx, perm[:k - len(idx)]]))
            km.partial_fit(np.asarray(emb[idx], dtype=np.float32))
            bar.update(1)
    bar.close()
    return km


def predict_memmap(km, emb: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Cluster id of every row of ``emb``, batch by batch."""
    out = np.empty(emb.shape[0], dtype=np.int64)
    for s in range(0, emb.shape[0], batch_size):
        out[s:s + batch_size] = km.predict(np.asarray(emb[s:s + batch_size], dtype=np.float32))
    return out


def sweep_k(emb: np.ndarray, rows: np.ndarray, ks: Sequence[int], *, seed: int = 0,
            batch_size: int = 1024, epochs: int = 5, silhouette_sample: int = 10000,
            progress: bool = True) -> tuple[dict, dict]:
    """Fit one MiniBatchKMeans per k on ``emb[rows]`` and score it by silhouette on a sample.

    Returns ``(report, models)``: ``report = {"per_k": {k: {...}}, "best_k": k, ...}``; k values that
    are infeasible (k >= number of points) are reported with ``"skipped"``.
    """
    from sklearn.metrics import silhouette_score

    rows = np.asarray(rows)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows, size=min(len(rows), silhouette_sample), replace=False))
    xs = np.asarray(emb[sample], dtype=np.float32)
    per_k: dict[str, dict] = {}
    models = {}
    for k in tqdm(list(ks), desc="regroup k sweep", file=sys.stderr, disable=not progress):
        if k < 2 or k >= len(rows):
            per_k[str(k)] = {"skipped": f"k={k} needs 2 <= k < number of documents ({len(rows)})"}
            continue
        km = fit_minibatch_kmeans(emb, rows, k, seed=seed, batch_size=batch_size, epochs=epochs,
                                  progress=progress)
        lab = km.predict(xs)
        used = int(len(np.unique(lab)))
        sil = float(silhouette_score(xs, lab)) if 2 <= used < len(xs) else float("nan")
        sizes = np.bincount(predict_memmap(km, emb)[rows], minlength=k).tolist()
        per_k[str(k)] = {"silhouette": sil, "inertia_sample": float(-km.score(xs)),
                         "clusters_used_in_sample": used, "sizes": sizes}
        models[k] = km
    scored = {int(k): v["silhouette"] for k, v in per_k.items()
              if "silhouette" in v and np.isfinite(v["silhouette"])}
    if not scored:
        raise ValueError(f"no k in {list(ks)} could be scored on {len(rows)} documents")
    best = max(scored, key=lambda k: (scored[k], -k))
    report = {"ks": [int(k) for k in ks], "per_k": per_k, "best_k": int(best),
              "silhouette_sample": int(len(sample)), "fit_documents": int(len(rows))}
    return report, models


def write_regrouped(data_dir: str | Path, out_dir: str | Path, refs: Sequence[DocRef],
                    labels: np.ndarray, k: int, *, progress: bool = True) -> dict:
    """Write ``out_dir/corpus/cluster_XX/{train,valid}.jsonl``, ``stats.json`` and ``mapping.jsonl``.

    Returns the contingency table ``{orig_domain: {cluster: docs}}`` and per-cluster doc counts.
    """
    from megamix.data.corpus import update_stats

    out = Path(out_dir)
    if Path(data_dir).resolve() == out.resolve():
        raise ValueError("out_dir must differ from data_dir (the regrouped corpus is a new data dir)")
    names = [cluster_name(c) for c in range(k)]
    handles = {}
    tmp_paths = {}
    for name in names:
        for split in SPLITS:
            p = out / "corpus" / name / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            handles[(name, split)] = open(tmp, "w", encoding="utf-8")
            tmp_paths[(name, split)] = (tmp, p)
    mapping_path = out / "regroup" / "mapping.jsonl"
    mapping_path.parent.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict] = {n: {s: {"docs": 0, "bytes": 0} for s in SPLITS} for n in names}
    contingency: dict[str, dict[str, int]] = {}
    labels = np.asarray(labels)
    if len(labels) != len(refs):
        raise ValueError(f"{len(labels)} labels for {len(refs)} documents")
    try:
        with open(mapping_path, "w", encoding="utf-8") as mf:
            stream = tqdm(iter_texts(data_dir, refs), total=len(refs), unit="doc",
                          desc="regroup write", file=sys.stderr, disable=not progress)
            for pos, (ref, row) in enumerate(stream):
                if ref != refs[pos]:
                    raise RuntimeError("document stream out of order with the references")
                c = int(labels[pos])
                name = names[c]
                text = row["text"]
                src = f"{ref.domain}:{row.get('source', '')}"
                handles[(name, ref.split)].write(json.dumps({"text": text, "source": src},
                                                            ensure_ascii=False) + "\n")
                st = stats[name][ref.split]
                st["docs"] += 1
                st["bytes"] += len(text.encode("utf-8"))
                contingency.setdefault(ref.domain, {}).setdefault(name, 0)
                contingency[ref.domain][name] += 1
                mf.write(json.dumps({"domain": ref.domain, "split": ref.split, "line": ref.line,
                                     "cluster": name}) + "\n")
    finally:
        for h in handles.values():
            h.close()
    for tmp, final in tmp_paths.values():
        os.replace(tmp, final)
    entries = {}
    for name in names:
        entries[name] = dict(stats[name])
        entries[name]["provenance"] = {"regroup_of": str(Path(data_dir)),
                                       "from_domains": {d: v[name] for d, v in contingency.items()
                                                        if name in v}}
    update_stats(out, entries)
    return {"contingency": contingency,
            "cluster_docs": {n: stats[n]["train"]["docs"] + stats[n]["valid"]["docs"] for n in names}}


def regroup(data_dir: str | Path, out_dir: str | Path, ks: Sequence[int], *,
            embedder: str | object = "minilm", max_tokens: int = 128, max_docs: int | None = None,
            domains: Sequence[str] | None = None, seed: int = 0, embed_batch: int = 64,
            kmeans_batch: int = 1024, epochs: int = 5, silhouette_sample: int = 10000,
            tokenize: bool = True, plot: bool = True, overwrite: bool = False,
            progress: bool = True) -> dict:
    """The whole Regroup stage; returns the report (also written to ``out_dir/regroup/report.json``).

    ``embedder`` is a name for :func:`megamix.embed.get_embedder` or an embedder object.
    """
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("give at least one k, e.g. --k 4,6,8")
    out = Path(out_dir)
    if Path(data_dir).resolve() == out.resolve():
        raise ValueError("out_dir must differ from data_dir (the regrouped corpus is a new data dir)")
    stale = [out / d for d in ("corpus", "tokens", "regroup") if (out / d).exists()]
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds {[p.name for p in stale]}; pass overwrite=True "
                              "(CLI: --overwrite) to replace them")
    for p in stale:
        shutil.rmtree(p)
    refs = collect_refs(data_dir, domains, max_docs)
    if isinstance(embedder, str):
        from megamix.embed import get_embedder
        emb_model = get_embedder(embedder, max_tokens=max_tokens)
    else:
        emb_model = embedder
    emb = embed_to_memmap((row["text"] for _, row in iter_texts(data_dir, refs)), len(refs), emb_model,
                          out / "regroup" / "embeddings.npy", batch_size=embed_batch,
                          max_chars=8 * max_tokens, progress=progress)
    train_rows = np.array([i for i, r in enumerate(refs) if r.split == "train"], dtype=np.int64)
    report, models = sweep_k(emb, train_rows, ks, seed=seed, batch_size=kmeans_batch, epochs=epochs,
                             silhouette_sample=silhouette_sample, progress=progress)
    k = report["best_k"]
    labels = predict_memmap(models[k], emb)
    written = write_regrouped(data_dir, out, refs, labels, k, progress=progress)
    report.update(written)
    report.update({"data_dir": str(data_dir), "out_dir": str(out), "embedder": getattr(emb_model, "key", str(embedder)),
                   "documents": len(refs), "domains": sorted({r.domain for r in refs}),
                   "clusters": [cluster_name(c) for c in range(k)], "seed": seed})
    if tokenize:
        from megamix.data.tokenize import recorded_tokenizer, tokenize_corpus
        tokenize_corpus(out, [cluster_name(c) for c in range(k)], force=True, progress=progress,
                        tokenizer=recorded_tokenizer(Path(data_dir) / "tokens"))  # the source store's tokenizer
    if plot:
        from megamix.regroup.plots import plot_regroup
        report["plot"] = str(plot_regroup(report, out / "regroup" / "regroup.png"))
    (out / "regroup").mkdir(parents=True, exist_ok=True)
    with open(out / "regroup" / "report.json", "w") as f:
        json.dump(report, f, indent=1)
    return report

"""R&B *Regroup* (offline): embed documents, k-means with a k sweep scored by silhouette, and write
the clusters out as new domains ``cluster_00, cluster_01, ...``. Every document is kept.

Scales past one process and past memory:

- **every** document is assigned: k-means is *fitted* (and k scored) on a seeded sample of at most
  ``fit_docs`` training documents, then every document, train and valid, goes to its nearest centroid;
- **sharded over ranks** (torchrun, deepspeed or SLURM launchers; gloo is enough): the documents are
  cut into global batches of ``embed_batch``; rank r embeds and assigns a contiguous range of whole
  batches, so a document is embedded in the same batch whatever the world size and 2 ranks give
  exactly what 1 rank gives. The fitting sample is all-gathered, rank 0 fits and broadcasts the
  centroids, labels are all-gathered and rank 0 writes the corpus. Communication is the sample
  (``fit_docs × dim`` floats) plus one int per document;
- **resumable**: each rank's embeddings go to ``regroup/shards/rank<r>-of-<W>.npy`` (a memmap) with a
  progress file updated after every batch; a killed run started again with the same arguments
  continues where it stopped (``regroup/plan.json`` records the arguments that must match);
- documents stream from ``corpus/<domain>/{train,valid}.jsonl``; only ``(domain, split, line)``
  references stay in memory; the silhouette is computed on at most ``silhouette_sample`` points of
  the fitting sample.

Outputs under ``out_dir``: ``corpus/cluster_XX/{train,valid}.jsonl`` (``source`` is
``"<orig domain>:<orig source>"``), ``corpus/stats.json``, ``tokens/`` (via
:func:`megamix.data.tokenize.tokenize_corpus`), ``regroup/{mapping.jsonl, centroids.npy, report.json,
regroup.png}``, and the resumable state ``regroup/{plan.json, shards/}``.
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

import hashlib

import numpy as np
from tqdm import tqdm

from megamix import comm
from megamix.data.corpus import corpus_domains, iter_jsonl
from megamix.io import atomic_write_json, tmp_path

__all__ = ["DocRef", "collect_refs", "iter_texts", "embed_to_memmap", "fit_minibatch_kmeans",
           "predict_memmap", "sweep_k", "write_regrouped", "regroup", "cluster_name", "shard_rows",
           "fit_sample_rows", "nearest_centroid"]

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


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for raw in f if raw.strip())


def collect_refs(data_dir: str | Path, domains: Sequence[str] | None = None) -> list[DocRef]:
    """References to every document to regroup, in (domain, split, line) order."""
    root = Path(data_dir) / "corpus"
    if not root.is_dir():
        raise FileNotFoundError(f"no corpus under {root}; run `megamix data build` first")
    avail = corpus_domains(data_dir)
    doms = list(domains) if domains else avail
    missing = [d for d in doms if d not in avail]
    if missing:
        raise FileNotFoundError(f"no corpus/<domain>/train.jsonl for {missing} under {root}")
    if not doms:
        raise FileNotFoundError(f"no domains under {root}")
    refs: list[DocRef] = []
    for dom in doms:
        for split in SPLITS:
            n = _count_lines(root / dom / f"{split}.jsonl")
            refs.extend(DocRef(dom, split, i) for i in range(n))
    return refs


def shard_rows(n: int, batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows ``[lo, hi)``: a contiguous range of whole global batches of ``batch`` rows,
    so batch boundaries (and hence embeddings) do not depend on the world size."""
    n_batches = math.ceil(n / batch)
    b0, b1 = n_batches * rank // world_size, n_batches * (rank + 1) // world_size
    return min(n, b0 * batch), min(n, b1 * batch)


def fit_sample_rows(refs: Sequence[DocRef], fit_docs: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of at most ``fit_docs`` training documents."""
    train = np.array([i for i, r in enumerate(refs) if r.split == "train"], dtype=np.int64)
    if len(train) <= fit_docs:
        return train
    return np.sort(np.random.default_rng(seed).choice(train, size=fit_docs, replace=False))


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean) of every row of ``x``."""
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float32)
    d = (c * c).sum(1)[None, :] - 2.0 * (x @ c.T)
    return np.argmin(d, axis=1).astype(np.int64)


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
        for line, row in enumerate(iter_jsonl(root / dom / f"{split}.jsonl")):
            if line in wanted:
                yield wanted[line], row
            if line >= last:
                break
        i = j


def embed_to_memmap(texts, n: int, embedder, path: str | Path, *, batch_size: int = 64,
                    max_chars: int | None = 2000, progress: bool = True, desc: str = "regroup embed") -> np.memmap:
    """Embed ``n`` texts in batches of ``batch_size`` into a float32 ``.npy`` memmap ``[n, embedder.dim]``.

    Resumable: ``<path>.progress.json`` records how many rows are done after every batch, and a call
    with the same ``n``, embedder and batch size continues from there. ``texts`` is an iterator of the
    ``n`` texts, or a callable ``start -> iterator of the texts from row start`` (needed to resume).
    ``max_chars`` truncates each text before embedding (the embedder truncates tokens as well).
    """
    if n < 1:
        raise ValueError("nothing to embed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prog_path = path.with_name(path.name + ".progress.json")
    want = {"n": int(n), "dim": int(embedder.dim), "key": str(getattr(embedder, "key", type(embedder).__name__)),
            "batch_size": int(batch_size)}
    done = 0
    if path.exists() and prog_path.exists():
        prog = json.loads(prog_path.read_text())
        if {k: prog.get(k) for k in want} == want:
            done = int(prog["rows"])
    if done == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, int(embedder.dim))).flush()
        atomic_write_json(prog_path, {**want, "rows": 0})
    out = np.load(path, mmap_mode="r+")
    if done < n:
        if done and not callable(texts):
            raise ValueError(f"{path} is {done}/{n} rows done; resuming needs texts as a callable start -> iterator")
        it = texts(done) if callable(texts) else iter(texts)
        bar = tqdm(total=n, initial=done, unit="doc", desc=desc, file=sys.stderr, disable=not progress)
        pos = done
        while pos < n:
            batch = []
            for t in it:
                batch.append(t[:max_chars] if max_chars else t)
                if len(batch) == min(batch_size, n - pos):
                    break
            if not batch:
                break
            out[pos:pos + len(batch)] = np.asarray(embedder.encode(batch, batch_size=batch_size), dtype=np.float32)
            out.flush()
            pos += len(batch)
            atomic_write_json(prog_path, {**want, "rows": pos})
            bar.update(len(batch))
        bar.close()
        if pos != n:
            raise RuntimeError(f"expected {n} texts to embed, got {pos}")
    del out
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
            tmp = tmp_path(p)
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


def _gather(obj, world_size: int, group):
    return [obj] if world_size == 1 else comm.all_gather_object(obj, group)


def _broadcast(obj, world_size: int, group):
    return obj if world_size == 1 else comm.broadcast_object(obj, group)


def _group(world_size: int, group):
    """The group for :func:`megamix.comm.together`: this process alone in a one-rank regroup."""
    return comm.LOCAL if world_size == 1 else group


def _refs_digest(refs: Sequence[DocRef]) -> str:
    """Identifies the document set: files and their document counts."""
    h = hashlib.sha256()
    i = 0
    while i < len(refs):
        j = i
        while j < len(refs) and (refs[j].domain, refs[j].split) == (refs[i].domain, refs[i].split):
            j += 1
        h.update(f"{refs[i].domain}/{refs[i].split}:{j - i};".encode())
        i = j
    return h.hexdigest()[:16]


def _check_plan(path: Path, plan: dict, overwrite: bool) -> bool:
    """True when ``path`` holds the same plan (resume); writes it when absent; refuses a different one."""
    if path.exists() and not overwrite:
        old = json.loads(path.read_text())
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise FileExistsError(
                f"{path} is from a regroup with different {', '.join(f'{k}={old.get(k)!r}' for k in diff)} "
                f"(now {', '.join(f'{k}={plan[k]!r}' for k in diff)}); rerun with the same arguments to resume, "
                "or pass --overwrite to start again")
        return True
    return False


def regroup(data_dir: str | Path, out_dir: str | Path, ks: Sequence[int], *,
            embedder: str | object = "minilm", max_tokens: int = 128, fit_docs: int = 20000,
            domains: Sequence[str] | None = None, seed: int = 0, embed_batch: int = 64,
            kmeans_batch: int = 1024, epochs: int = 5, silhouette_sample: int = 10000,
            tokenize: bool = True, plot: bool = True, overwrite: bool = False,
            progress: bool = True, rank: int = 0, world_size: int = 1, group=None) -> dict:
    """The whole Regroup stage; every rank calls it. Returns the report (on every rank; also written
    to ``out_dir/regroup/report.json``).

    Args:
        embedder: a name for :func:`megamix.embed.get_embedder` or an embedder object.
        fit_docs: k-means is fitted and k scored on a seeded sample of at most this many training
            documents; every document is then assigned to its nearest centroid.
        rank, world_size, group: this process's place in an initialised ``torch.distributed`` group
            (gloo is enough); rank r embeds and assigns its shard (:func:`shard_rows`).
        overwrite: replace an earlier output; without it, an earlier run with the same arguments is
            resumed and a finished one (or different arguments) is refused.
    """
    ks = _check_regroup_args(data_dir, out_dir, ks, fit_docs, rank, world_size)
    out = Path(out_dir)
    refs = collect_refs(data_dir, domains)
    if isinstance(embedder, str):
        from megamix.embed import get_embedder
        emb_model = get_embedder(embedder, max_tokens=max_tokens)
    else:
        emb_model = embedder
    plan = {"data_dir": str(Path(data_dir).resolve()), "documents": len(refs), "refs": _refs_digest(refs),
            "embedder": str(getattr(emb_model, "key", type(emb_model).__name__)), "max_tokens": int(max_tokens),
            "embed_batch": int(embed_batch), "world_size": int(world_size)}
    rg = out / "regroup"
    grp = _group(world_size, group)
    _prepare_output(out, plan, overwrite, rank, grp)
    # --- embed this rank's shard (resumable)
    lo, hi = shard_rows(len(refs), embed_batch, rank, world_size)
    emb = None
    if hi > lo:
        emb = _embed_shard(data_dir, refs[lo:hi], emb_model, rg / "shards" / f"rank{rank:05d}-of-{world_size:05d}.npy",
                           embed_batch=embed_batch, max_tokens=max_tokens, progress=progress and rank == 0,
                           world_size=world_size)
    # --- fit on a seeded sample, gathered from the shards; rank 0 fits, everyone gets the centroids
    sample = fit_sample_rows(refs, fit_docs, seed)
    report, centroids = _fit_centroids(sample, emb, lo, hi, ks, seed=seed, kmeans_batch=kmeans_batch, epochs=epochs,
                                       silhouette_sample=silhouette_sample, progress=progress, rank=rank,
                                       world_size=world_size, group=group)
    k = report["best_k"]
    # --- assign every document of the shard, batch by (global) batch
    labels = np.empty(hi - lo, dtype=np.int64)
    for s in range(0, hi - lo, embed_batch):
        labels[s:s + embed_batch] = nearest_centroid(emb[s:s + embed_batch], centroids)
    all_labels = np.concatenate(_gather(labels, world_size, group))
    with comm.together(f"writing the regrouped corpus to {out}", grp):
        if rank == 0:
            _write_outputs(data_dir, out, rg, refs, all_labels, centroids, report, plan, sample, seed, k,
                           tokenize=tokenize, plot=plot, progress=progress, world_size=world_size)
    report = _broadcast(report, world_size, group)
    return report


def _check_regroup_args(data_dir, out_dir, ks: Sequence[int], fit_docs: int, rank: int, world_size: int) -> list[int]:
    """The distinct ``ks`` in increasing order, once the arguments of :func:`regroup` are checked."""
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("give at least one k, e.g. --k 4,6,8")
    if fit_docs < 2:
        raise ValueError(f"fit_docs must be >= 2 (got {fit_docs})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if Path(data_dir).resolve() == Path(out_dir).resolve():
        raise ValueError("out_dir must differ from data_dir (the regrouped corpus is a new data dir)")
    return ks


def _prepare_output(out: Path, plan: dict, overwrite: bool, rank: int, grp) -> None:
    """Rank 0 refuses a finished output (unless ``overwrite``), keeps an unfinished one with the same plan
    (resume) and otherwise starts ``out`` afresh with the plan. Ends in an agreement
    (:func:`megamix.comm.together`): if rank 0 fails, every rank stops with its error."""
    rg = out / "regroup"
    with comm.together(f"preparing the regroup output {out}", grp):
        if rank == 0:
            finished = [out / d for d in ("corpus", "tokens") if (out / d).exists()] + \
                ([rg / "report.json"] if (rg / "report.json").exists() else [])
            if finished and not overwrite:
                raise FileExistsError(f"{out} already holds a regroup ({', '.join(p.name for p in finished)}); "
                                      "pass --overwrite to replace it")
            if not _check_plan(rg / "plan.json", plan, overwrite):
                for p in [out / "corpus", out / "tokens", rg]:
                    if p.exists():
                        shutil.rmtree(p)
                rg.mkdir(parents=True)
                atomic_write_json(rg / "plan.json", plan)


def _embed_shard(data_dir, mine: Sequence[DocRef], emb_model, shard_path: Path, *, embed_batch: int,
                 max_tokens: int, progress: bool, world_size: int) -> np.ndarray:
    """Embeddings of this rank's documents ``mine``, in a resumable memmap at ``shard_path``."""
    return embed_to_memmap(lambda start: (row["text"] for _, row in iter_texts(data_dir, mine[start:])),
                           len(mine), emb_model, shard_path, batch_size=embed_batch, max_chars=8 * max_tokens,
                           progress=progress,
                           desc="regroup embed" + (f" [rank 0 of {world_size}]" if world_size > 1 else ""))


def _fit_centroids(sample: np.ndarray, emb, lo: int, hi: int, ks: Sequence[int], *, seed: int, kmeans_batch: int,
                   epochs: int, silhouette_sample: int, progress: bool, rank: int, world_size: int,
                   group) -> tuple[dict, np.ndarray]:
    """The k sweep's report and the best k's centroids, on every rank: each rank contributes the sampled rows
    of its shard ``[lo, hi)``, rank 0 sweeps k on them (in row order) and broadcasts the result."""
    in_mine = sample[(sample >= lo) & (sample < hi)]
    parts = _gather((in_mine, None if emb is None else np.asarray(emb[in_mine - lo], np.float32)),
                    world_size, group)
    fitted = None
    with comm.together("fitting the regroup k-means", _group(world_size, group)):
        if rank == 0:
            rows = np.concatenate([r for r, _ in parts])
            xs = np.concatenate([x for r, x in parts if x is not None])
            order = np.argsort(rows, kind="stable")
            xs = xs[order]
            report, models = sweep_k(xs, np.arange(len(xs)), ks, seed=seed, batch_size=kmeans_batch,
                                     epochs=epochs, silhouette_sample=silhouette_sample, progress=progress)
            fitted = (report, np.asarray(models[report["best_k"]].cluster_centers_, np.float32))
    return _broadcast(fitted, world_size, group)


def _write_outputs(data_dir, out, rg, refs, all_labels, centroids, report, plan, sample, seed, k, *, tokenize, plot,
                   progress, world_size) -> None:
    """Rank 0's part of :func:`regroup`: the centroids, the regrouped corpus, its token store, the plot and the
    report (``report`` is completed in place)."""
    np.save(rg / "centroids.npy", centroids)
    written = write_regrouped(data_dir, out, refs, all_labels, k, progress=progress)
    report.update(written)
    report.update({"data_dir": str(data_dir), "out_dir": str(out),
                   "embedder": plan["embedder"], "documents": len(refs), "world_size": world_size,
                   "fit_documents": int(len(sample)), "seed": seed,
                   "domains": sorted({r.domain for r in refs}),
                   "clusters": [cluster_name(c) for c in range(k)]})
    if tokenize:
        from megamix.data.tokenize import recorded_tokenizer, tokenize_corpus
        tokenize_corpus(out, [cluster_name(c) for c in range(k)], force=True, progress=progress,
                        tokenizer=recorded_tokenizer(Path(data_dir) / "tokens"))  # the source store's tokenizer
    if plot:
        from megamix.regroup.plots import plot_regroup
        report["plot"] = str(plot_regroup(report, rg / "regroup.png"))
    atomic_write_json(rg / "report.json", report)

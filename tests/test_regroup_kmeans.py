"""Regroup building blocks without the embedding model: memmap streaming, the k sweep, the writers,
every document kept, resume after a crash, 2 gloo ranks == 1 rank, and input validation (a fake corpus
of synthetic text)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamix.regroup import collect_refs, fit_minibatch_kmeans, predict_memmap, regroup, sweep_k
from megamix.regroup.core import embed_to_memmap, fit_sample_rows, iter_texts, nearest_centroid, shard_rows

REPO = Path(__file__).resolve().parents[1]


def _blobs(n_per=40, k=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 5
    truth = np.repeat(np.arange(k), n_per)
    return (centers[truth] + rng.normal(size=(len(truth), dim))).astype(np.float32), truth


def test_sweep_picks_true_k_from_memmap(tmp_path):
    x, truth = _blobs()
    path = tmp_path / "e.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    emb = np.load(path, mmap_mode="r")
    rows = np.arange(len(x))
    rep, models = sweep_k(emb, rows, [2, 3, 5, 500], batch_size=16, silhouette_sample=60,
                          progress=False)
    assert rep["best_k"] == 3
    assert "skipped" in rep["per_k"]["500"]
    assert rep["silhouette_sample"] == 60
    sil = {k: v["silhouette"] for k, v in rep["per_k"].items() if "silhouette" in v}
    assert sil["3"] == max(sil.values())
    labels = predict_memmap(models[3], emb, batch_size=7)
    for c in range(3):  # the true blobs are recovered (up to relabelling)
        assert len(np.unique(labels[truth == c])) == 1
    assert sum(rep["per_k"]["3"]["sizes"]) == len(x)


def test_minibatch_fit_is_deterministic():
    x, _ = _blobs(seed=3)
    a = fit_minibatch_kmeans(x, np.arange(len(x)), 3, seed=5, batch_size=10, progress=False)
    b = fit_minibatch_kmeans(x, np.arange(len(x)), 3, seed=5, batch_size=10, progress=False)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    with pytest.raises(ValueError):
        fit_minibatch_kmeans(x, np.arange(2), 3, progress=False)


class _FakeEmbedder:
    """Deterministic toy embedder: letter histogram (enough to separate the fake domains)."""

    dim = 26
    key = "fake"

    def encode(self, texts, batch_size=32, progress=False):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _fake_corpus(root, per=12):
    words = {"alpha": "aaa abba cab baa", "zulu": "zzz yzy xyz zyx", "mike": "mmm nmn omo mon"}
    for dom, w in words.items():
        for split, n in (("train", per), ("valid", 3)):
            p = root / "corpus" / dom / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"text": f"{w} {i} {w}", "source": f"{dom}-{i}"}) + "\n"
                                 for i in range(n)))


def test_collect_refs_keeps_every_document_and_streams(tmp_path):
    _fake_corpus(tmp_path)
    refs = collect_refs(tmp_path)
    assert len(refs) == 3 * (12 + 3)
    assert sorted({r.domain for r in refs}) == ["alpha", "mike", "zulu"]
    rows = list(iter_texts(tmp_path, refs))
    assert [r for r, _ in rows] == refs
    assert rows[0][1]["source"] == "alpha-0"
    sample = fit_sample_rows(refs, 10, seed=0)
    assert len(sample) == 10 and all(refs[i].split == "train" for i in sample)
    np.testing.assert_array_equal(sample, fit_sample_rows(refs, 10, seed=0))
    assert len(fit_sample_rows(refs, 10_000, seed=0)) == 36  # all train documents
    with pytest.raises(FileNotFoundError):
        collect_refs(tmp_path, domains=["nope"])
    with pytest.raises(ValueError):
        embed_to_memmap(iter([]), 0, _FakeEmbedder(), tmp_path / "x.npy")


@pytest.mark.parametrize("n,batch,world", [(45, 4, 2), (45, 4, 3), (7, 8, 2), (100, 10, 4), (3, 1, 5)])
def test_shards_are_whole_global_batches_covering_every_row(n, batch, world):
    spans = [shard_rows(n, batch, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (lo, hi), (lo2, _) in zip(spans, spans[1:]):
        assert hi == lo2 and lo % batch == 0 and lo <= hi


def test_nearest_centroid_matches_brute_force():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    brute = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_centroid(x, c), brute)


class _Crash(RuntimeError):
    pass


class _CrashingEmbedder(_FakeEmbedder):
    """Fails after ``ok_batches`` encode calls; counts the texts it embedded."""

    def __init__(self, ok_batches=None):
        self.ok_batches, self.calls, self.texts = ok_batches, 0, 0

    def encode(self, texts, batch_size=32, progress=False):
        if self.ok_batches is not None and self.calls >= self.ok_batches:
            raise _Crash("killed")
        self.calls += 1
        self.texts += len(texts)
        return super().encode(texts, batch_size, progress)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fit_on_a_sample_assigns_every_document_and_resumes_after_a_crash(tmp_path):
    _fake_corpus(tmp_path / "data", per=30)
    kw = dict(tokenize=False, plot=False, progress=False, kmeans_batch=8, embed_batch=4, fit_docs=20)
    ref = regroup(tmp_path / "data", tmp_path / "ref", [2, 3, 4], embedder=_FakeEmbedder(), **kw)
    assert ref["fit_documents"] == 20 and ref["documents"] == 3 * 33
    assert sum(ref["cluster_docs"].values()) == 99  # every document, not only the fitted sample
    assert len((tmp_path / "ref" / "regroup" / "mapping.jsonl").read_text().splitlines()) == 99
    assert ref["best_k"] == 3
    # a crash after 5 embedding batches, then the same command again: it resumes from row 20
    crash = _CrashingEmbedder(ok_batches=5)
    with pytest.raises(_Crash):
        regroup(tmp_path / "data", tmp_path / "out", [2, 3, 4], embedder=crash, **kw)
    again = _CrashingEmbedder()
    rep = regroup(tmp_path / "data", tmp_path / "out", [2, 3, 4], embedder=again, **kw)
    assert crash.texts == 20 and again.texts == 99 - 20
    for name in ("mapping.jsonl", "centroids.npy"):
        assert (tmp_path / "out" / "regroup" / name).read_bytes() == (tmp_path / "ref" / "regroup" / name).read_bytes()
    assert rep["per_k"] == ref["per_k"]
    # finished: refused without --overwrite; different arguments: refused, naming them
    with pytest.raises(FileExistsError, match="overwrite"):
        regroup(tmp_path / "data", tmp_path / "out", [3], embedder=_FakeEmbedder(), **kw)
    (tmp_path / "part").mkdir()
    with pytest.raises(_Crash):
        regroup(tmp_path / "data", tmp_path / "part", [3], embedder=_CrashingEmbedder(1), **kw)
    with pytest.raises(FileExistsError, match="embed_batch"):
        regroup(tmp_path / "data", tmp_path / "part", [3], embedder=_FakeEmbedder(),
                **{**kw, "embed_batch": 8})


def _cli_regroup(out, data, nproc):
    cmd = ["regroup", "--data-dir", str(data), "--out-dir", str(out), "--k", "2,3,4", "--embedder", "hashing",
           "--embed-batch", "4", "--kmeans-batch", "8", "--fit-docs", "40", "--no-progress", "--no-tokenize"]
    if nproc == 1:
        argv = [sys.executable, "-m", "megamix"] + cmd
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 2000), "-m", "megamix"] + cmd
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_gloo_ranks_give_exactly_what_one_rank_gives(tmp_path):
    _fake_corpus(tmp_path / "data", per=30)
    _cli_regroup(tmp_path / "one", tmp_path / "data", 1)
    r2 = _cli_regroup(tmp_path / "two", tmp_path / "data", 2)
    assert "best k" in r2.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in (two / "regroup" / "shards").glob("*.npy")) == [
        "rank00000-of-00002.npy", "rank00001-of-00002.npy"]
    for rel in ["regroup/mapping.jsonl", "regroup/centroids.npy", "corpus/stats.json"] + [
            str(p.relative_to(one)) for p in sorted((one / "corpus").glob("*/*.jsonl"))]:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    rep1, rep2 = (json.loads((d / "regroup" / "report.json").read_text()) for d in (one, two))
    assert rep1["per_k"] == rep2["per_k"] and rep2["world_size"] == 2 and rep2["documents"] == 99


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_regroup_writes_new_domains(tmp_path):
    _fake_corpus(tmp_path / "data")
    out = tmp_path / "out"
    rep = regroup(tmp_path / "data", out, [2, 3, 4], embedder=_FakeEmbedder(), tokenize=False,
                  plot=False, progress=False, kmeans_batch=8)
    assert rep["best_k"] == 3
    names = rep["clusters"]
    # each source domain lands in exactly one cluster; splits are preserved
    for dom, cont in rep["contingency"].items():
        assert len(cont) == 1 and sum(cont.values()) == 15
    for name in names:
        tr = (out / "corpus" / name / "train.jsonl").read_text().splitlines()
        va = (out / "corpus" / name / "valid.jsonl").read_text().splitlines()
        assert len(tr) == 12 and len(va) == 3
        assert json.loads(tr[0])["source"].split(":")[0] in rep["contingency"]
    stats = json.loads((out / "corpus" / "stats.json").read_text())
    assert sorted(stats["domains"]) == names
    mapping = (out / "regroup" / "mapping.jsonl").read_text().splitlines()
    assert len(mapping) == 45
    assert json.loads((out / "regroup" / "report.json").read_text())["best_k"] == 3
    with pytest.raises(FileExistsError):
        regroup(tmp_path / "data", out, [3], embedder=_FakeEmbedder(), tokenize=False, plot=False,
                progress=False)
    with pytest.raises(ValueError, match="differ"):
        regroup(tmp_path / "data", tmp_path / "data", [3], embedder=_FakeEmbedder(), progress=False)

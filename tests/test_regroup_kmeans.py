"""Regroup building blocks without the embedding model: memmap streaming, the k sweep, the writers
and input validation (a fake corpus of synthetic text)."""
import json

import numpy as np
import pytest

from megamix.regroup import collect_refs, fit_minibatch_kmeans, predict_memmap, regroup, sweep_k
from megamix.regroup.core import embed_to_memmap, iter_texts


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


def test_collect_refs_quota_and_stream(tmp_path):
    _fake_corpus(tmp_path)
    refs = collect_refs(tmp_path, max_docs=10)
    train = [r for r in refs if r.split == "train"]
    assert len(train) == 10
    assert sorted({r.domain for r in train}) == ["alpha", "mike", "zulu"]
    rows = list(iter_texts(tmp_path, refs))
    assert [r for r, _ in rows] == refs
    assert rows[0][1]["source"] == "alpha-0"
    with pytest.raises(FileNotFoundError):
        collect_refs(tmp_path, domains=["nope"])
    with pytest.raises(ValueError):
        embed_to_memmap(iter([]), 0, _FakeEmbedder(), tmp_path / "x.npy")


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

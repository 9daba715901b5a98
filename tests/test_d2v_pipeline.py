"""End-to-end Domain2Vec on a tiny real corpus with the hashing embedder: vocabulary, classifier,
vectoriser, mixture file, plots and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamix.domain2vec.classifier import EmbeddingLogRegClassifier, load_classifier, train_classifier
from megamix.domain2vec.corpus import Passage
from megamix.domain2vec.da2 import da2_objective, dirichlet_alpha, dirichlet_search, solve_exact
from megamix.domain2vec.mixture_io import mixture_dict, write_mixture
from megamix.domain2vec.plots import plot_vectors
from megamix.domain2vec.vectorize import domain_vector, load_vectors, vectorize_corpus
from megamix.domain2vec.vocab import MetaDomainVocab, build_vocab, collect_reference
from megamix.embed import HashingEmbedder

SPEC = {"name": "hashing", "max_tokens": 256, "kwargs": {}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from megamix.data.testing import build_tiny_store

    root = tmp_path_factory.mktemp("d2v")
    build_tiny_store(root / "data")
    out = root / "d2v"
    vocab = build_vocab(root / "data", out, k=8, embedder=HashingEmbedder(), embedder_spec=SPEC,
                        docs_per_domain=80, elbow_ks=[2, 4, 8], progress=False, seed=0)
    clf = train_classifier(out)
    return root, vocab, clf


def test_vocab_artifacts(world):
    root, vocab, _ = world
    out = root / "d2v"
    for f in ("vocab.npz", "vocab.json", "reference.npz", "elbow.json", "elbow.png"):
        assert (out / f).is_file(), f
    loaded = MetaDomainVocab.load(out)
    assert loaded.n == vocab.n and 7 <= vocab.n <= 8 + 3
    np.testing.assert_allclose(np.linalg.norm(loaded.centroids, axis=1), 1.0, atol=1e-5)
    meta = json.loads((out / "vocab.json").read_text())
    assert meta["embedder"]["name"] == "hashing" and sum(c["size"] for c in meta["clusters"]) == meta["n_passages"]
    assert any(g.startswith("code:") for g in loaded.groups)  # python code got its own group
    elbow = json.loads((out / "elbow.json").read_text())
    assert elbow["inertia"]["global"][0] > elbow["inertia"]["global"][-1]


def test_classifier_above_chance_on_real_domains(world):
    root, _, _ = world
    ps = collect_reference(root / "data", docs_per_domain=60, seed=1)
    doms = sorted({p.domain for p in ps})
    y = np.array([doms.index(p.domain) for p in ps])
    emb = HashingEmbedder()
    clf = EmbeddingLogRegClassifier(emb, SPEC, n_classes=len(doms))
    rep = clf.fit_embeddings(emb.encode([p.text for p in ps]), y, holdout=0.3)
    assert rep["heldout_acc"] > 0.7 > 1.5 * rep["chance_acc"]


def test_meta_classifier_roundtrip_and_report(world):
    root, vocab, clf = world
    assert clf.report["heldout_acc"] > clf.report["chance_acc"]
    again = load_classifier(root / "d2v")
    texts = ["def f(x):\n    return x + 1\n", "This program is free software; you can redistribute it."]
    p1, p2 = clf.predict_proba(texts), again.predict_proba(texts)
    np.testing.assert_allclose(p1, p2)
    assert p1.shape == (2, vocab.n)
    np.testing.assert_allclose(p1.sum(axis=1), 1.0)


def test_vectorizer_seeded_and_mixture_file(world, tmp_path):
    root, vocab, clf = world
    a = vectorize_corpus(clf, root / "data", tmp_path / "v1.json", n_samples=30, seed=5,
                         meta_names=vocab.names(), progress=False)
    b = vectorize_corpus(clf, root / "data", None, n_samples=30, seed=5, progress=False)
    c = vectorize_corpus(clf, root / "data", None, n_samples=30, seed=6, progress=False)
    np.testing.assert_array_equal(np.array(a["V_train"]), np.array(b["V_train"]))
    assert not np.allclose(np.array(a["V_train"]), np.array(c["V_train"]))
    V = np.array(a["V_train"])
    np.testing.assert_allclose(V.sum(axis=1), 1.0)
    vec = load_vectors(tmp_path / "v1.json")
    assert vec.v_valid is not None and len(vec.valid_domains) == len(vec.domains)
    # each domain's own validation set is closest to its own training vector
    for i, d in enumerate(vec.valid_domains):
        dist = np.abs(vec.V_train - vec.V_valid[i]).sum(axis=1)
        assert vec.domains[int(np.argmin(dist))] == d
    ex = solve_exact(vec.V_train, vec.v_valid)
    ds = dirichlet_search(da2_objective(vec.V_train, vec.v_valid), dirichlet_alpha(None, len(vec.domains)),
                          n_samples=5000, top_k=20)
    path = tmp_path / "mix.json"
    write_mixture(path, vec.domains, ds.weights, "da2", {"exact": ex.weights}, max_drift=0.2)
    from megamix.mixture import load_mixture
    w, doc = load_mixture(path, vec.domains)
    np.testing.assert_allclose(w, ds.weights / ds.weights.sum())
    assert doc["meta"]["max_drift"] == 0.2
    from megamix.config import MegamixConfig
    MegamixConfig.from_dict({"mixture": {"kind": "file", "file": str(path)}}).validate()
    pngs = plot_vectors(vec, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in pngs)


def test_bad_inputs(world, tmp_path):
    root, vocab, clf = world
    with pytest.raises(ValueError, match="empty dataset"):
        domain_vector(clf, [])
    empty = tmp_path / "data" / "corpus" / "void"
    empty.mkdir(parents=True)
    (empty / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match="void"):
        vectorize_corpus(clf, tmp_path / "data", None, domains=["void"], progress=False)
    with pytest.raises(ValueError, match="domains"):
        mixture_dict(["a", "b"], [0.5, 0.3, 0.2], "da2")
    with pytest.raises(ValueError, match="duplicate"):
        mixture_dict(["a", "a"], [0.5, 0.5], "da2")
    with pytest.raises(ValueError, match="max_drift"):
        mixture_dict(["a", "b"], [0.5, 0.5], "da2", max_drift=2.0)
    with pytest.raises(ValueError, match="labels"):
        EmbeddingLogRegClassifier(HashingEmbedder(), SPEC, 3).fit_embeddings(np.zeros((4, 256)), np.array([0, 1, 2, 5]))
    with pytest.raises(FileNotFoundError):
        MetaDomainVocab.load(tmp_path / "nothing")
    path = tmp_path / "mix.json"
    write_mixture(path, ["a", "b"], [0.5, 0.5], "da2")
    from megamix.mixture import load_mixture
    with pytest.raises(ValueError):
        load_mixture(path, ["a", "c"])
    with pytest.raises(ValueError, match="empty"):
        build_vocab(root / "data", tmp_path / "v", k=2, embedder=HashingEmbedder(), embedder_spec=SPEC,
                    passages=[], progress=False)
    assert isinstance(Passage("t", "d", "s"), Passage)


def test_cli_help_and_da2(world, tmp_path):
    root, _, _ = world
    repo = Path(__file__).resolve().parents[1]
    for step in ("vocab", "classify", "vectorize", "da2", "regmix", "evaluate", "plot"):
        r = subprocess.run([sys.executable, "-m", "megamix", "d2v", step, "--help"], cwd=repo,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout, (step, r.stderr[-500:])
    vec_path = tmp_path / "vectors.json"
    clf = load_classifier(root / "d2v")
    vectorize_corpus(clf, root / "data", vec_path, n_samples=20, seed=0, progress=False,
                     train_tokens={"changelogs": 100, "code_python": 100, "legal": 100, "manpages": 1000})
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "megamix", "d2v", "da2", "--vectors", str(vec_path),
                        "--total-tokens", "1000", "--samples", "3000", "--top-k", "10", "--out", str(out)],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["method"] == "da2" and abs(sum(doc["weights"].values()) - 1) < 1e-9
    for d in ("changelogs", "code_python", "legal"):
        assert doc["weights"][d] <= 0.1 + 1e-9  # data-amount cap: 100 tokens of 1000, 1 epoch


def test_transformer_classifier_interface():
    from megamix.domain2vec.classifier import TransformerClassifier

    class LengthClassifier(TransformerClassifier):
        """Scores by text length: short texts -> class 0, long -> class 1."""

        def logits(self, texts):
            n = np.array([len(t) for t in texts], float)
            return np.stack([10 - n, n - 10], axis=1)

        def save(self, path):
            pass

    clf = LengthClassifier(2)
    p = clf.predict_proba(["a", "a" * 50, "abc"], batch_size=2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert list(clf.predict(["a", "a" * 50])) == [0, 1]
    v = domain_vector(clf, ["a", "b", "c" * 40, "d" * 40])
    np.testing.assert_allclose(v, [0.5, 0.5], atol=1e-3)

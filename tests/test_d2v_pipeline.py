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
from megamix.mixture import mixture_dict, write_mixture
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
    meta = doc["meta"]
    assert 0 < meta["delta"] < meta["delta_info"]["abs_diff_max"] <= 1 and meta["delta_arg"] == "auto"
    assert meta["dirichlet"] == "scaled" and "dirichlet_search_paper_alpha" in meta
    r = subprocess.run([sys.executable, "-m", "megamix", "d2v", "da2", "--vectors", str(vec_path), "--delta", "-1"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--delta" in r.stderr


def test_validation_documents_roundtrip_and_changed_corpus_refused(world, tmp_path):
    import shutil

    from megamix.domain2vec.metaloss import load_valid_docs

    root, _, clf = world
    vec_path = tmp_path / "vectors.json"
    vectorize_corpus(clf, root / "data", vec_path, n_samples=7, seed=2, progress=False)
    vec = load_vectors(vec_path)
    docs = load_valid_docs(vec)
    assert len(docs) == vec.raw["valid"]["docs"]["n"] == sum(min(7, c) for c in np.bincount(docs.domain_idx))
    for k in range(len(vec.valid_domains)):  # V_valid is exactly the mean of the recorded rows
        np.testing.assert_allclose(docs.proba[docs.domain_idx == k].mean(axis=0) / docs.proba[docs.domain_idx == k].mean(axis=0).sum(),
                                   vec.V_valid[k], rtol=1e-12)
    assert abs(docs.weights.sum() - 1) < 1e-12 and all(len(t) > 0 for t in docs.texts)
    np.testing.assert_allclose(clf.predict_proba(docs.texts), docs.proba, rtol=1e-6, atol=1e-9)
    moved = tmp_path / "moved"
    shutil.copytree(root / "data" / "corpus", moved / "corpus")
    assert load_valid_docs(vec, moved).texts == docs.texts  # the corpus may move, not change
    f = moved / "corpus" / vec.valid_domains[0] / "valid.jsonl"
    objs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    f.write_text("".join(json.dumps({**o, "text": o["text"].upper()}) + "\n" for o in objs))
    with pytest.raises(ValueError, match="corpus changed"):
        load_valid_docs(vec, moved)
    (tmp_path / "vectors.valid_docs.npz").unlink()
    with pytest.raises(FileNotFoundError, match="vectorize"):
        load_valid_docs(vec)


def _fake_make_trainer_fn(calls):
    """Stands in for the real proxy trainer: losses follow the mixture, one loss per document."""
    from megamix.domain2vec.regmix import ProxyResult

    def make(cfg, root, *, steps=None, docs=None, progress=False):
        def train_fn(weights, index):
            calls.append(index)
            w = np.array(list(weights.values()))
            vl = {d: float(3 + (1 - x) ** 2 + 0.1 * i) for i, (d, x) in enumerate(weights.items())}
            dl = None if docs is None else [float(3 + w[int(k)] * (1 + j % 3)) for j, k in enumerate(docs.domain_idx)]
            return ProxyResult(vl, dl)
        return train_fn
    return make


def test_cli_evaluate_records_budget_vectors_and_predictors(world, tmp_path, monkeypatch):
    """evaluate.json records the proxy budget (from --proxy-steps, which also sets the proxies'
    data-amount caps), a vectors path that exists with its hash, the Huber δ rule, and every
    predictor's rank correlation on all mixtures and without the sparse ones; regmix reuses the proxies."""
    import hashlib

    import megamix.domain2vec.evaluate as ev
    from megamix.cli import main

    root, _, clf = world
    vec_path = tmp_path / "vectors.json"
    vectorize_corpus(clf, root / "data", vec_path, n_samples=6, seed=0, progress=False,
                     train_tokens={"changelogs": 3000, "code_python": 3000, "legal": 3000, "manpages": 3000})
    calls = []
    monkeypatch.setattr(ev, "make_trainer_fn", _fake_make_trainer_fn(calls))
    # train.steps is far beyond the corpus (the target run's caps would be infeasible); proxies run 3 steps
    common = ["--vectors", str(vec_path), "--set", f"data.data_dir={root / 'data'}", "--set", "train.steps=100000",
              "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=4", "--set", "model.seq_len=16",
              "--proxy-steps", "3", "--samples", "2000", "--top-k", "10", "--proxy-dir", str(tmp_path / "px")]
    rc = main(["d2v", "evaluate", *common, "--mixtures", "4", "--sparse", "2", "--pairs", "2", "--bootstrap", "20"])
    assert rc == 0
    rep = json.loads((tmp_path / "evaluate.json").read_text())
    cfg = rep["config"]
    assert cfg["proxy"]["steps"] == 3 and cfg["proxy"]["tokens"] == 3 * 4 * 16 and cfg["proxy"]["proxy_steps_arg"] == 3
    assert cfg["proxy"]["caps"]["legal"] == pytest.approx(min(1.0, 3000 / 192))
    assert Path(cfg["vectors"]).is_file()
    assert cfg["vectors_sha256"] == hashlib.sha256(Path(cfg["vectors"]).read_bytes()).hexdigest()
    assert 0 < cfg["delta"] < 1 and "quantile 0.5" in cfg["delta_info"]["rule"] and cfg["dirichlet"] == "scaled"
    assert rep["n_runs"] == 4 + 2 + 2 + 4 and rep["subset_sizes"]["without_sparse"] == 8
    for sub in ("all", "without_sparse"):
        assert {"da2_huber", "da2_huber_delta1", "l1_to_uniform", "neg_entropy", "regmix_cv_bayes",
                "regmix_cv_argmax", "regmix_cv_proba"} <= set(rep["correlations"][sub])
    assert {r["group"] for r in rep["runs"]} == {"dirichlet", "sparse", "pair", "reference", "da2_pick"}
    assert len(calls) == 12
    calls.clear()
    rc = main(["d2v", "regmix", *common, "--proxies", "4", "--set", "train.steps=2",
               "--out", str(tmp_path / "rm.json")])
    assert rc == 0 and calls == []  # the same Dirichlet draws: every proxy comes from the shared cache
    meta = json.loads((tmp_path / "rm.json").read_text())["meta"]
    assert meta["meta_targets"] == "argmax" and meta["proxy"]["steps"] == 3 and "argmax" in meta["meta_loss_mapping"]
    assert isinstance(meta["meta_domains_without_target"], list)


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


@pytest.mark.slow
def test_real_proxies_scored_per_document(world, tmp_path):
    """The real trainer as proxy: every proxy is scored on the validation documents; the proxy trained
    on a single domain fits that domain's documents better than the other proxy does."""
    from megamix.config import MegamixConfig
    from megamix.domain2vec.evaluate import make_trainer_fn
    from megamix.domain2vec.metaloss import load_valid_docs
    from megamix.domain2vec.regmix import run_proxies

    root, _, clf = world
    vec_path = tmp_path / "vectors.json"
    vectorize_corpus(clf, root / "data", vec_path, n_samples=6, seed=0, progress=False)
    vec = load_vectors(vec_path)
    docs = load_valid_docs(vec)
    cfg = MegamixConfig.from_dict({"data": {"data_dir": str(root / "data")},
                                   "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "seq_len": 16},
                                   "train": {"steps": 30, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.01,
                                             "eval_batches": 1, "threads": 1}})
    fn = make_trainer_fn(cfg, tmp_path / "px", docs=docs)
    m = len(vec.domains)
    R = np.eye(m)[[0, 1]]
    runs = run_proxies(R, fn, vec.domains, cache_path=tmp_path / "px" / "proxies.jsonl", docs_sha=docs.sha256,
                       progress=False)
    D = np.array([r.doc_loss for r in runs])
    assert D.shape == (2, len(docs)) and np.isfinite(D).all()
    own0 = D[:, docs.domain_idx == vec.valid_domains.index(vec.domains[0])].mean(axis=1)
    own1 = D[:, docs.domain_idx == vec.valid_domains.index(vec.domains[1])].mean(axis=1)
    assert own0[0] < own0[1] and own1[1] < own1[0]

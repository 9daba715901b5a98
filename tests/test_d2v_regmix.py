"""Domain2Vec+RegMix with a fake, cheap train_fn: proxies, loss mapping, LightGBM recovery."""
import json
from dataclasses import dataclass

import numpy as np
import pytest

from megamix.domain2vec.da2 import dirichlet_alpha
from megamix.domain2vec.evaluate import (correlations, evaluate_predictions, evaluation_mixtures,
                                         naive_predictors)
from megamix.domain2vec.regmix import (D2VRegMix, ProxyResult, domain_to_meta_losses, run_proxies,
                                       sample_mixtures)
from megamix.domain2vec.vectorize import DomainVectors

DOMS = ["a", "b", "c"]


def _world(seed=0):
    rng = np.random.default_rng(seed)
    V = rng.dirichlet(np.full(4, 0.4), size=3)      # train domain vectors
    Vv = rng.dirichlet(np.full(4, 0.4), size=3)     # valid domain vectors
    return V, Vv


R_STAR = np.array([0.5, 0.3, 0.2])


def _fake_losses(r, V, Vv):
    """A known loss surface with an interior minimiser at R_STAR: each validation domain's loss grows
    quadratically with the distance of the training distribution r @ V from R_STAR @ V."""
    x, xs = r @ V, R_STAR @ V
    return {d: float(2.0 + i * 0.3 + (4.0 + i) * np.sum((x - xs) ** 2)) for i, d in enumerate(DOMS)}


@dataclass
class FakeResult:
    valid_loss: dict


def test_run_proxies_calls_train_fn_and_caches(tmp_path):
    V, Vv = _world()
    R = sample_mixtures(3, 5, seed=0)
    calls = []

    def train_fn(w, i):
        calls.append(i)
        return FakeResult(_fake_losses(np.array([w[d] for d in DOMS]), V, Vv))

    cache = tmp_path / "p.jsonl"
    runs = run_proxies(R, train_fn, DOMS, cache_path=cache, progress=False)
    assert calls == list(range(5)) and len(runs) == 5
    assert set(runs[0].valid_loss) == set(DOMS)
    assert len(cache.read_text().splitlines()) == 5
    calls.clear()
    again = run_proxies(R, train_fn, DOMS, cache_path=cache, progress=False)
    assert calls == [] and [r.valid_loss for r in again] == [r.valid_loss for r in runs]
    with pytest.raises(ValueError, match="mixtures must be"):
        run_proxies(R[:, :2], train_fn, DOMS, progress=False)
    with pytest.raises(ValueError, match="sum to 1"):
        run_proxies(R * 2, train_fn, DOMS, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        run_proxies(R, lambda w, i: {"a": float("nan")}, DOMS, progress=False)


def test_meta_loss_mapping_preserves_weighted_objective():
    _, Vv = _world(1)
    rng = np.random.default_rng(0)
    L = rng.uniform(2, 5, size=(7, 3))
    w = np.array([0.2, 0.5, 0.3])
    Y = domain_to_meta_losses(L, Vv, w)
    q = w @ Vv
    np.testing.assert_allclose(Y @ q, L @ w, rtol=1e-10)
    with pytest.raises(ValueError):
        domain_to_meta_losses(L[:, :2], Vv)


def test_lightgbm_regmix_recovers_minimiser():
    V, Vv = _world(0)
    w_valid = np.full(3, 1 / 3)
    q = w_valid @ Vv
    R = sample_mixtures(3, 150, seed=2)
    runs = run_proxies(R, lambda w, i: _fake_losses(np.array([w[d] for d in DOMS]), V, Vv), DOMS,
                       progress=False)
    L = np.array([[r.valid_loss[d] for d in DOMS] for r in runs])
    model = D2VRegMix(V, seed=0).fit(R, domain_to_meta_losses(L, Vv, w_valid))
    res = model.search(q, dirichlet_alpha(None, 3), n_samples=20_000, top_k=50, seed=0)

    def true_obj(r):
        return np.mean(list(_fake_losses(r, V, Vv).values()))

    g = np.arange(0, 1.0001, 0.01)
    grid = np.clip(np.array([(a, b, 1 - a - b) for a in g for b in g if a + b <= 1 + 1e-9]), 0, 1)
    tv = np.array([true_obj(r) for r in grid])
    gap = (true_obj(res.weights) - tv.min()) / (np.median(tv) - tv.min())
    assert gap < 0.05, (gap, res.weights, grid[tv.argmin()])
    assert np.abs(res.weights - R_STAR).max() < 0.1
    assert res.method == "d2v_regmix" and abs(res.weights.sum() - 1) < 1e-9
    # held-out ranking quality of the fitted surface
    Rt = sample_mixtures(3, 40, seed=9)
    pred = model.predict(Rt, q)
    act = np.array([true_obj(r) for r in Rt])
    assert correlations(pred, act)["spearman"] > 0.8


def test_regmix_errors():
    V, _ = _world()
    m = D2VRegMix(V)
    with pytest.raises(RuntimeError):
        m.predict_meta(np.ones((1, 3)) / 3)
    with pytest.raises(ValueError, match="at least 4"):
        m.fit(np.ones((2, 3)) / 3, np.ones((2, 4)))
    with pytest.raises(ValueError, match="mixtures must be"):
        m.fit(np.ones((5, 2)) / 2, np.ones((5, 4)))


def test_evaluate_predictions_with_fake_trainer(tmp_path):
    V, Vv = _world(0)
    w = np.full(3, 1 / 3)
    vec = DomainVectors({"domains": DOMS, "V_train": V.tolist(), "meta_domains": list("wxyz"),
                         "valid": {"domains": DOMS, "V_valid": Vv.tolist(), "weights": w.tolist(),
                                   "v_valid": (R_STAR @ V).tolist()}})
    R = sample_mixtures(3, 12, seed=4)
    rep = evaluate_predictions(vec, R, lambda wt, i: _fake_losses(np.array([wt[d] for d in DOMS]), V, Vv),
                               cache_path=tmp_path / "e.jsonl", progress=False)
    assert rep["n_runs"] == 12 and set(rep["da2"]) == {"huber", "l2", "l1", "kl", "js", "huber_delta1"}
    assert set(rep["naive"]) == {"l1_to_uniform", "neg_entropy"}
    assert set(rep["regmix_cv"]) == {"bayes"} and np.isfinite(rep["regmix_cv"]["bayes"]["spearman"])
    # on this surface (loss grows with ||r@V - v_valid||) L2 alignment ranks the losses exactly
    assert rep["da2"]["l2"]["spearman"] > 0.99 and rep["da2"]["huber"]["spearman"] > 0.99
    lo, hi = rep["da2"]["l2"]["spearman_ci95"]
    assert lo <= rep["da2"]["l2"]["spearman"] <= hi
    json.dumps(rep)


def test_evaluate_predictions_with_documents_reports_all_targets(tmp_path):
    """Documents whose losses cut across domains: the measured targets disagree with the Bayes ones."""
    from megamix.domain2vec.metaloss import ValidDocs, doc_weights

    V, Vv = _world(0)
    rng = np.random.default_rng(3)
    dom = np.repeat(np.arange(3), 4)
    P = rng.dirichlet(np.full(4, 0.3), size=len(dom))
    w = np.full(3, 1 / 3)
    Vv = np.stack([P[dom == k].mean(axis=0) for k in range(3)])
    docs = ValidDocs(DOMS, dom, np.arange(len(dom)), P, doc_weights(dom, w), sha256="x")
    vec = DomainVectors({"domains": DOMS, "V_train": V.tolist(), "meta_domains": list("wxyz"),
                         "valid": {"domains": DOMS, "V_valid": Vv.tolist(), "weights": w.tolist(),
                                   "v_valid": (w @ Vv).tolist()}})
    hard = P.argmax(axis=1)

    def train_fn(wt, i):
        r = np.array([wt[d] for d in DOMS])
        x = r @ V
        doc = 3.0 - 2.0 * x[hard] + 0.1 * dom  # a document is easy when its meta-domain was trained on
        vl = {d: float(doc[dom == k].mean()) for k, d in enumerate(DOMS)}
        return ProxyResult(vl, doc.tolist())

    R, labels, groups = evaluation_mixtures(3, n_dirichlet=6, alpha=np.ones(3), n_sparse=2, n_pairs=2, seed=0)
    rep = evaluate_predictions(vec, R, train_fn, labels=labels, groups=groups, delta=0.05, docs=docs,
                               cache_path=tmp_path / "p.jsonl", progress=False, n_boot=50)
    assert set(rep["regmix_cv"]) == {"bayes", "argmax", "proba"}
    assert rep["subset_sizes"] == {"all": 10, "without_sparse": 6}
    mt = rep["meta_targets"]
    assert mt["proba_identity_max_abs"] < 1e-12
    assert mt["argmax"]["mean_abs_diff_vs_bayes"] > 0.05
    assert set(rep["correlations"]["without_sparse"]) == set(rep["correlations"]["all"])
    assert all(len(r["meta_loss_argmax"]) == 4 for r in rep["runs"])
    json.dumps(rep)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 10 and all(json.loads(x)["docs_sha"] == "x" for x in lines)


def test_run_proxies_shares_the_cache_by_mixture_and_key(tmp_path):
    V, Vv = _world()
    calls = []

    def train_fn(w, i):
        calls.append(i)
        r = np.array([w[d] for d in DOMS])
        return ProxyResult(_fake_losses(r, V, Vv), [float(r[0]), 1.0])

    cache = tmp_path / "p.jsonl"
    R = sample_mixtures(3, 4, seed=0)
    key = {"steps": 10, "model": {"n_embd": 8}}
    run_proxies(R, train_fn, DOMS, cache_path=cache, key=key, docs_sha="d1", progress=False)
    calls.clear()
    # another command asks for two of the same mixtures in another order, plus a new one
    R2 = np.stack([R[2], sample_mixtures(3, 1, seed=7)[0], R[0]])
    runs = run_proxies(R2, train_fn, DOMS, cache_path=cache, key=dict(key), docs_sha="d1", progress=False)
    assert calls == [1] and runs[0].weights == dict(zip(DOMS, R[2].tolist()))
    assert runs[2].doc_loss == [float(R[0][0]), 1.0]
    calls.clear()
    run_proxies(R[:2], train_fn, DOMS, cache_path=cache, key={**key, "steps": 20}, progress=False)
    assert calls == [0, 1]  # another budget is another proxy
    calls.clear()
    run_proxies(R[:2], train_fn, DOMS, cache_path=cache, key=key, docs_sha="d2", progress=False)
    assert calls == [0, 1]  # losses on other documents cannot be reused
    calls.clear()
    run_proxies(R[:2], train_fn, DOMS, cache_path=cache, key=key, progress=False)
    assert calls == []      # without documents, any entry of the same budget will do
    with pytest.raises(ValueError, match="doc_loss"):
        run_proxies(R[:1], lambda w, i: _fake_losses(np.array([w[d] for d in DOMS]), V, Vv), DOMS,
                    key={"new": 1}, docs_sha="d1", progress=False)


def test_evaluation_mixtures_groups_and_naive_predictors():
    alpha = np.array([1.0, 2.0, 1.5, 0.5])
    R, labels, groups = evaluation_mixtures(4, n_dirichlet=5, alpha=alpha, n_sparse=40, n_pairs=4, seed=3,
                                            domains=list("abcd"))
    assert R.shape == (49, 4) and np.allclose(R.sum(axis=1), 1)
    assert groups.count("dirichlet") == 5 and groups.count("sparse") == 40 and groups.count("pair") == 4
    pairs = R[np.array(groups) == "pair"]
    assert all(sorted(p[p > 0].round(6).tolist()) == [0.3, 0.7] for p in pairs)
    assert len({lb for lb, g in zip(labels, groups) if g == "pair"}) == 4 and labels[-1].startswith("pair:")
    # the same Dirichlet draws whatever the other groups' counts
    R2, _, _ = evaluation_mixtures(4, n_dirichlet=5, alpha=alpha, n_sparse=0, n_pairs=0, seed=3)
    np.testing.assert_array_equal(R2, R[:5])
    caps = np.array([0.6, 1.0, 1.0, 1.0])
    Rc, _, gc = evaluation_mixtures(4, n_dirichlet=5, alpha=alpha, n_sparse=5, n_pairs=3, seed=3, caps=caps)
    assert np.all(Rc <= caps + 1e-12)
    nv = naive_predictors(np.array([[0.25] * 4, [0.7, 0.3, 0, 0], [1.0, 0, 0, 0]]))
    np.testing.assert_allclose(nv["l1_to_uniform"], [0.0, 1.0, 1.5])
    np.testing.assert_allclose(nv["neg_entropy"], [np.log(0.25), 0.7 * np.log(0.7) + 0.3 * np.log(0.3), 0.0])

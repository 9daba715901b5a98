"""Domain2Vec+RegMix with a fake, cheap train_fn: proxies, loss mapping, LightGBM recovery."""
import json
from dataclasses import dataclass

import numpy as np
import pytest

from megamix.domain2vec.da2 import dirichlet_alpha
from megamix.domain2vec.evaluate import correlations, evaluate_predictions
from megamix.domain2vec.regmix import D2VRegMix, domain_to_meta_losses, run_proxies, sample_mixtures
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
    assert rep["n_runs"] == 12 and set(rep["da2"]) == {"huber", "l2", "l1", "kl", "js"}
    assert rep["regmix_cv"] is not None and np.isfinite(rep["regmix_cv"]["spearman"])
    # on this surface (loss grows with ||r@V - v_valid||) L2 alignment ranks the losses exactly
    assert rep["da2"]["l2"]["spearman"] > 0.99 and rep["da2"]["huber"]["spearman"] > 0.99
    json.dumps(rep)

"""DA² solvers: exact vs brute force, Dirichlet search vs exact, constraints, bad input, Huber δ and
the Dirichlet α options."""
from pathlib import Path

import numpy as np
import pytest

from megamix.domain2vec.da2 import (DISTANCES, da2_objective, data_caps, dirichlet_alpha, dirichlet_search,
                                    distance, distance_batch, huber_delta_auto, search_alpha, solve_exact)
from megamix.simplex import project_capped


def _grid(step=1 / 300):
    g = np.arange(0, 1 + 1e-12, step)
    R = np.array([(a, b, 1 - a - b) for a in g for b in g if a + b <= 1 + 1e-12])
    return np.clip(R, 0, 1)


def _instance(seed, m=3, n=6):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(n, 0.5), size=m), rng.dirichlet(np.ones(n))


@pytest.mark.parametrize("kind", DISTANCES)
def test_exact_matches_brute_force(kind):
    G = _grid()
    for seed in range(2):
        V, v = _instance(seed)
        brute = distance_batch(G @ V, v, kind).min()
        res = solve_exact(V, v, kind)
        assert res.value <= brute + 1e-6, (kind, res.value, brute)
        assert abs(res.weights.sum() - 1) < 1e-9 and res.weights.min() >= 0
        if kind != "l1":
            pgd = solve_exact(V, v, kind, method="pgd")
            assert abs(pgd.value - res.value) <= 1e-6 * max(1.0, abs(res.value))


def test_exact_recovers_planted_mixture():
    rng = np.random.default_rng(3)
    V = rng.dirichlet(np.full(8, 0.3), size=4)
    r_true = np.array([0.1, 0.4, 0.0, 0.5])
    res = solve_exact(V, r_true @ V, "huber")
    np.testing.assert_allclose(res.weights, r_true, atol=2e-3)


@pytest.mark.parametrize("kind", ["huber", "l2", "js"])
def test_dirichlet_close_to_exact(kind):
    V, v = _instance(5)
    exact = solve_exact(V, v, kind)
    res = dirichlet_search(da2_objective(V, v, kind), dirichlet_alpha(None, 3), n_samples=100_000,
                           top_k=100, seed=0)
    assert np.abs(res.weights - exact.weights).max() < 0.05
    # relative to the spread of objective values, the top-k average is near-optimal
    spread = np.median(distance_batch(_grid(0.05) @ V, v, kind)) - exact.value
    assert res.value - exact.value < 0.02 * spread


def test_constraints_respected_both_solvers():
    V, v = _instance(7, m=4, n=6)
    free = solve_exact(V, v, "huber")
    big = int(np.argmax(free.weights))
    tokens = np.full(4, 1000.0)
    tokens[big] = 100.0  # the favourite domain only holds 100 tokens
    caps = data_caps(tokens, total_tokens=1000.0, epochs=2.0)  # cap = 0.2 on it
    assert caps[big] == pytest.approx(0.2)
    ex = solve_exact(V, v, "huber", caps=caps)
    ds = dirichlet_search(da2_objective(V, v), dirichlet_alpha(tokens, 4), n_samples=30_000, caps=caps, seed=1)
    for r in (ex.weights, ds.weights):
        assert np.all(r <= caps + 1e-9) and abs(r.sum() - 1) < 1e-9 and r.min() >= 0
    assert ex.weights[big] == pytest.approx(0.2, abs=1e-6)
    assert ds.info["n_feasible"] < 30_000
    assert ex.value >= free.value - 1e-12


def test_infeasible_and_bad_inputs():
    with pytest.raises(ValueError, match="infeasible"):
        data_caps(np.array([10.0, 10.0]), total_tokens=100.0, epochs=1.0)
    V, v = _instance(0)
    with pytest.raises(ValueError, match="meta-domains"):
        solve_exact(V, v[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        solve_exact(np.zeros((0, 6)), v)
    with pytest.raises(ValueError, match="unknown distance"):
        solve_exact(V, v, "cosine")
    with pytest.raises(ValueError, match="caps"):
        solve_exact(V, v, caps=np.array([0.1, 0.1]))
    with pytest.raises(ValueError, match="none of the"):
        dirichlet_search(da2_objective(V, v), np.array([50.0, 1e-3, 1e-3]), n_samples=500,
                         caps=np.array([0.3, 0.9, 0.9]))


def test_projection_and_distances():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.normal(size=5)
        hi = rng.uniform(0.25, 1.0, size=5)
        x = project_capped(y, hi)
        assert abs(x.sum() - 1) < 1e-9 and np.all(x >= 0) and np.all(x <= hi + 1e-12)
        # optimality: no feasible random point is closer to y
        for _ in range(20):
            z = project_capped(rng.normal(size=5), hi)
            assert np.sum((x - y) ** 2) <= np.sum((z - y) ** 2) + 1e-9
    p, q = np.array([0.5, 0.5]), np.array([0.5, 0.5])
    for kind in DISTANCES:
        assert distance(p, q, kind) == pytest.approx(0.0, abs=1e-9)
    assert distance(np.array([1.0, 0]), np.array([0, 1.0]), "l1") == pytest.approx(2.0)
    assert distance(np.array([1.0, 0]), np.array([0, 1.0]), "js") == pytest.approx(np.log(2), rel=1e-6)


COMMITTED_VECTORS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "d2v" / "vectors.json"


def test_huber_delta_one_is_half_mse_and_auto_delta_is_a_real_huber():
    """On the committed domain vectors of the real corpus: δ = 1 gives exactly ½·MSE (the same ranking
    as L2), the automatic δ puts half of the component differences in the linear part, and the loss
    is then not a multiple of the MSE and ranks candidates differently from L2."""
    from scipy.stats import spearmanr

    from megamix.domain2vec.vectorize import load_vectors

    vec = load_vectors(COMMITTED_VECTORS)
    alpha = search_alpha(vec.tokens_array(), len(vec.domains), "scaled")
    delta, info = huber_delta_auto(vec.V_train, vec.v_valid, alpha, seed=0)
    R = np.random.default_rng(1).dirichlet(alpha, size=3000)
    D = R @ vec.V_train - vec.v_valid
    half_mse = 0.5 * (D ** 2).mean(axis=1)
    np.testing.assert_allclose(distance_batch(R @ vec.V_train, vec.v_valid, "huber", 1.0), half_mse, rtol=1e-12)
    assert info["linear_fraction_at_delta_1"] == 0.0 and info["abs_diff_max"] < 1.0
    assert 0 < delta < info["abs_diff_quantiles"]["p90"] and 0.4 < info["linear_fraction"] < 0.6
    hub = distance_batch(R @ vec.V_train, vec.v_valid, "huber", delta)
    ratio = hub / half_mse
    assert ratio.max() / ratio.min() > 1.5  # not ½·MSE times a constant
    assert spearmanr(hub, half_mse)[0] < 0.999  # and not a monotone transform of it either
    assert spearmanr(distance_batch(R @ vec.V_train, vec.v_valid, "huber", 1.0), half_mse)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="quantile"):
        huber_delta_auto(vec.V_train, vec.v_valid, alpha, quantile=1.0)


def test_search_alpha_scaled_and_paper():
    tokens = np.array([100.0, 300.0, 600.0])
    paper = search_alpha(tokens, 3, "paper")
    np.testing.assert_allclose(paper, [0.1, 0.3, 0.6])            # the paper's Dirichlet(a_train)
    np.testing.assert_allclose(search_alpha(tokens, 3, "scaled"), [0.3, 0.9, 1.8])
    np.testing.assert_allclose(search_alpha(None, 4, "scaled"), 1.0)  # uniform on the simplex
    np.testing.assert_allclose(search_alpha(tokens, 3, "scaled", 2.0), [0.6, 1.8, 3.6])
    rng = np.random.default_rng(0)
    top_paper = rng.dirichlet(paper, size=4000).max(axis=1).mean()
    top_scaled = rng.dirichlet(search_alpha(tokens, 3, "scaled"), size=4000).max(axis=1).mean()
    assert top_paper > top_scaled + 0.08  # the literal α draws mixtures nearer a vertex
    with pytest.raises(ValueError, match="concentration"):
        search_alpha(tokens, 3, "paper", 2.0)
    with pytest.raises(ValueError, match="scaled"):
        search_alpha(tokens, 3, "flat")

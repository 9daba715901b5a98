"""DoGraph objectives, simplex projection, k-means and the cluster -> domain mapping, checked
against scipy / brute force on small inputs."""
import numpy as np
import pytest
from scipy.optimize import brentq, minimize

from megamix.simplex import project
from megamix.strategies.dograph import (alignment_residual, alignment_weights, clusters_to_domains,
                                        cluster_stats, robust_weights, uncertainty_weights,
                                        variance_objective, variance_weights)
from megamix.strategies.kmeans import kmeans


def _simplex_min(f, m, seed=0, starts=6):
    """Minimise f over the simplex with SLSQP from several starts; best result."""
    rng = np.random.default_rng(seed)
    best = None
    cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0}]
    for s in range(starts):
        x0 = np.full(m, 1.0 / m) if s == 0 else rng.dirichlet(np.ones(m))
        r = minimize(f, x0, method="SLSQP", bounds=[(0, 1)] * m, constraints=cons,
                     options={"ftol": 1e-14, "maxiter": 1000})
        if best is None or r.fun < best.fun:
            best = r
    return best.x, best.fun


@pytest.mark.parametrize("seed", range(5))
def test_project_simplex_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=6) * 2
    p = project(v)
    assert p.min() >= 0 and abs(p.sum() - 1) < 1e-12
    q, _ = _simplex_min(lambda x: np.sum((x - v) ** 2), 6, seed)
    np.testing.assert_allclose(p, q, atol=1e-5)


def test_project_simplex_fixed_points_and_errors():
    x = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(project(x), x)
    np.testing.assert_allclose(project(np.array([5.0, 5.0])), [0.5, 0.5])
    with pytest.raises(ValueError):
        project(np.array([np.nan, 1.0]))


@pytest.mark.parametrize("seed", range(4))
def test_variance_objective_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    m, k = 4, 10
    means = rng.normal(size=(m, k)) * rng.uniform(0.3, 3.0, size=(m, 1)) + rng.normal(size=k)
    sizes = rng.integers(5, 30, size=m).astype(float)
    overall = sizes @ means / sizes.sum()
    w = variance_weights(means, overall, beta=1.0, iters=5000)
    s = np.sqrt(np.mean(np.sum(means ** 2, axis=1)))
    f = lambda x: variance_objective(x, means / s, overall / s, 1.0)
    q, fq = _simplex_min(f, m, seed)
    assert f(w) <= fq + 1e-7
    np.testing.assert_allclose(w, q, atol=2e-3)


def test_variance_equalises_contributions_without_direction_term():
    means = np.diag([1.0, 2.0, 4.0])
    w = variance_weights(means, np.zeros(3), beta=0.0, iters=5000)
    # beta=0: minimiser is pi_c * |g_c| constant -> pi ∝ 1/|g_c|
    np.testing.assert_allclose(w, np.array([4, 2, 1]) / 7, atol=1e-6)


def test_variance_scale_invariant():
    rng = np.random.default_rng(3)
    means = rng.normal(size=(3, 5))
    ov = means.mean(0)
    np.testing.assert_allclose(variance_weights(means, ov), variance_weights(1e-4 * means, 1e-4 * ov),
                               atol=1e-9)


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_robust_softmax_is_entropy_regularised_max(tau):
    h = np.array([0.5, 1.5, 1.0, -0.2])
    w = robust_weights(h, tau)
    f = lambda x: -(x @ h - tau * np.sum(x * np.log(np.maximum(x, 1e-300))))
    q, _ = _simplex_min(f, 4)
    np.testing.assert_allclose(w, q, atol=1e-4)


def test_uncertainty_closed_form_matches_scipy():
    v = np.array([0.5, 2.0, 1.0, 4.0])
    w = uncertainty_weights(v)
    q, _ = _simplex_min(lambda x: np.sum(x ** 2 * v), 4)
    np.testing.assert_allclose(w, q, atol=1e-5)
    with pytest.raises(FloatingPointError):
        uncertainty_weights(np.array([1.0, np.nan]))


def test_alignment_fixed_point_matches_brentq_two_clusters():
    means = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.5]])
    tau = 0.5
    w = alignment_weights(means, tau, iters=500)
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    r = lambda a: alignment_residual(np.array([a, 1 - a]), unit, tau)[0]
    a_star = brentq(r, 1e-9, 1 - 1e-9)
    assert abs(w[0] - a_star) < 1e-8
    # a fixed point of the defining equation
    assert np.max(np.abs(alignment_residual(w, unit, tau))) < 1e-10


def test_alignment_fixed_point_general():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(5, 8))
    w = alignment_weights(means, 1.0, iters=1000)
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    assert np.max(np.abs(alignment_residual(w, unit, 1.0))) < 1e-9
    # independent of the starting point (unique fixed point here)
    w2 = alignment_weights(means, 1.0, init=np.array([0.9, 0.025, 0.025, 0.025, 0.025]), iters=1000)
    np.testing.assert_allclose(w, w2, atol=1e-8)


def test_kmeans_recovers_blobs_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    truth = np.repeat(np.arange(3), 30)
    x = centers[truth] + rng.normal(size=(90, 2))
    a = kmeans(x, 3, seed=7)
    b = kmeans(x, 3, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    # same partition as the truth up to relabelling
    for c in range(3):
        assert len(np.unique(a.labels[truth == c])) == 1
    assert len(np.unique(a.labels)) == 3


def test_kmeans_degenerate_inputs():
    x = np.ones((5, 3))  # one distinct point: k collapses to 1
    r = kmeans(x, 4, seed=0)
    assert r.k == 1 and np.all(r.labels == 0)
    with pytest.raises(ValueError):
        kmeans(np.zeros((0, 3)), 2)
    with pytest.raises(ValueError):
        kmeans(np.array([[np.nan, 1.0]]), 1)


def test_cluster_stats_empty_cluster():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    sizes, means, var = cluster_stats(x, np.array([0, 0, 2]), 3)
    np.testing.assert_array_equal(sizes, [2, 0, 1])
    np.testing.assert_allclose(means[0], [1, 0])
    assert var[0] == pytest.approx(1.0) and np.isnan(var[1]) and np.isnan(var[2])


def test_clusters_to_domains_hand_example():
    # cluster 0: 3 samples from domain 0, 1 from domain 1; cluster 1: 2 from domain 2
    labels = np.array([0, 0, 0, 0, 1, 1])
    doms = np.array([0, 0, 0, 1, 2, 2])
    w, n = clusters_to_domains(np.array([0.6, 0.4]), labels, doms, 4)
    np.testing.assert_allclose(w, [0.6 * 0.75, 0.6 * 0.25, 0.4, 0.0])
    np.testing.assert_array_equal(n, [[3, 1, 0, 0], [0, 0, 2, 0]])


def test_clusters_to_domains_no_preference_is_no_change():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=200)
    doms = rng.integers(0, 3, size=200)
    nc = np.bincount(labels, minlength=4)
    w, _ = clusters_to_domains(nc / nc.sum(), labels, doms, 3)
    np.testing.assert_allclose(w, np.bincount(doms, minlength=3) / 200)


def test_clusters_to_domains_errors():
    with pytest.raises(FloatingPointError):
        clusters_to_domains(np.array([0.0, 1.0]), np.array([0, 0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError):
        clusters_to_domains(np.array([1.0]), np.array([0]), np.array([5]), 2)

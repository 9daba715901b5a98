"""DoGraph: hand-computed objectives, the two variants (gradient reweighting and domain sampling),
the cluster table, and exact-vs-projected agreement with tolerances that a noise projection fails.

The agreement fixture has unequal domain sizes (28, 14, 6), so the uninformed answer (a cluster
structure unrelated to the gradients puts each domain's mass at its share of the samples,
0.58/0.29/0.125) is far from the informed one; domains also differ in gradient scale, so the
variance and uncertainty objectives have something to find. Measured over 3 data seeds x 8 projection
seeds (k1 = k2 = 32) and 8 noise seeds, the largest projected error / smallest noise error of the
per-domain update mass were: variance 0.077 / 0.185, robust 0.000 / 0.321, alignment 0.061 / 0.226,
uncertainty 0.103 / 0.605. The tolerances sit between the two.
"""
import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamix.kernels.projection import make_projection
from megamix.config import MixingConfig
from megamix.strategies import DoGraphSampleStrategy, DoGraphStrategy, build_strategy
from megamix.strategies.dograph import (PAPER_CLUSTERS, alignment_weights, clusters_to_domains, robust_weights,
                                        uncertainty_weights, variance_weights)
from megamix.strategies.exact import exact_lm_head_grads, snapshot_from_per_sample
from megamix.strategies.base import GradientReweighter
from strategy_driver import propose


def _cfg(**kw):
    kw.setdefault("min_weight", 0.0)
    kw.setdefault("strategy", "dograph")
    return MixingConfig(**kw)


# ---------------------------------------------------------------------------------------- hand-computed
def test_variance_hand_computed():
    """ḡ1 = (1, 0), ḡ2 = (0, 2), overall ḡ = (1, 1), β = 1. After the RMS scaling s = √2.5:
    a = (1, 2)/s, lin = ⟨ḡ_c, ḡ⟩/‖ḡ‖² = (1/2, 1). With π = (p, 1-p) the objective is
    (p·a1 - (1-p)·a2)² - (p/2 + (1-p)); its minimiser is p = a2/(a1+a2) + β(l1-l2)/(2(a1+a2)²)
    = 2/3 - 0.5/7.2 = 43/72."""
    w = variance_weights(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([1.0, 1.0]), beta=1.0, iters=5000)
    np.testing.assert_allclose(w, [43 / 72, 29 / 72], atol=1e-9)


def test_robust_hand_computed():
    """softmax(h/τ): h = (0, ln 3), τ = 1 -> (1/4, 3/4); τ = 0.5 -> (1/10, 9/10)."""
    np.testing.assert_allclose(robust_weights(np.array([0.0, math.log(3)]), 1.0), [0.25, 0.75], atol=1e-12)
    np.testing.assert_allclose(robust_weights(np.array([0.0, math.log(3)]), 0.5), [0.1, 0.9], atol=1e-12)


def test_alignment_hand_computed():
    """ḡ1 = ḡ2 = (1, 0), ḡ3 = (-1, 0), τ = 1: while π1 + π2 > π3 the aggregate points along (1, 0),
    so the cosines are (1, 1, -1) and the fixed point is softmax(1, 1, -1) = (e², e², 1)/(2e² + 1)."""
    w = alignment_weights(np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), 1.0, iters=500)
    e2 = math.e ** 2
    np.testing.assert_allclose(w, np.array([e2, e2, 1.0]) / (2 * e2 + 1), atol=1e-10)


def test_uncertainty_hand_computed_end_to_end():
    """Cluster A: (10, ±1, 0), variance 1; cluster B: (±2, 0, 10), variance 4. π ∝ 1/σ² = (0.8, 0.2);
    q = (0.5, 0.5), so A's samples get the factor 1.6 and B's 0.4."""
    np.testing.assert_allclose(uncertainty_weights(np.array([1.0, 4.0])), [0.8, 0.2], atol=1e-12)
    rows = np.array([[10, 1, 0], [10, -1, 0], [2, 0, 10], [-2, 0, 10]], dtype=float)
    s = build_strategy(_cfg(dograph_objective="uncertainty", dograph_clusters=2), ["a", "b"], [0.5, 0.5])
    s.observe(snapshot_from_per_sample(rows, np.array([0, 1, 0, 1]), ["a", "b"]))
    np.testing.assert_allclose(propose(s, 1), [0.5, 0.5])   # domain weights never change
    f = s.sample_factors(torch.tensor(rows, dtype=torch.float32))
    torch.testing.assert_close(f, torch.tensor([1.6, 1.6, 0.4, 0.4]))


# ---------------------------------------------------------------------------------------- variants
def _cross_domain_rows(seed=0):
    """Two clusters (directions e1 and e2) that each hold 10 samples of each of two domains; the e2
    samples have loss 3, the e1 samples loss 1, so both domains have the same mean loss 2."""
    rng = np.random.default_rng(seed)
    k = 6
    lab = np.repeat([0, 1, 0, 1], 10)
    dom = np.repeat([0, 0, 1, 1], 10)
    rows = np.eye(k)[lab] * 5 + 0.2 * rng.normal(size=(40, k))
    loss = np.where(lab == 1, 3.0, 1.0)
    return rows, dom, lab, loss


def test_robust_uses_each_clusters_own_loss():
    """The clusters cut across the domains, whose mean losses are equal: the average domain loss of a
    cluster's members would give equal hardness (uniform π); each cluster's own loss gives softmax(1, 3)."""
    rows, dom, lab, loss = _cross_domain_rows()
    s = build_strategy(_cfg(dograph_objective="robust", dograph_clusters=2), ["a", "b"], [0.5, 0.5])
    s.observe(snapshot_from_per_sample(rows, dom, ["a", "b"], per_sample_loss=loss))
    propose(s, 1)
    c_of_e2 = int(np.argmax(s.centroids[:, 1]))
    pi = s.cluster_weights[[1 - c_of_e2, c_of_e2]]
    np.testing.assert_allclose(pi, np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum(), atol=1e-9)
    # the sampling variant maps this π to the domains' own shares: the clusters' weights are lost
    samp = build_strategy(_cfg(strategy="dograph-sample", dograph_objective="robust", dograph_clusters=2),
                          ["a", "b"], [0.5, 0.5])
    samp.observe(snapshot_from_per_sample(rows, dom, ["a", "b"], per_sample_loss=loss))
    np.testing.assert_allclose(propose(samp, 1), [0.5, 0.5], atol=1e-12)
    # ... whereas the reweighting gives the e2 cluster (0.88 of π) 0.88 of the update
    f = s.sample_factors(torch.tensor(rows, dtype=torch.float32)).double().numpy()
    w = f / f.mean()
    assert abs(w[lab == 1].sum() / w.sum() - pi[1]) < 1e-6


def test_issue_example_even_contingency_loses_pi():
    """π = [0.09, 0.91] with an even contingency table: domain weights [0.5, 0.5] (dograph-sample)."""
    w, n = clusters_to_domains(np.array([0.09, 0.91]), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 2)
    assert w.tolist() == [0.5, 0.5] and n.tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize("objective", ["variance", "robust", "alignment", "uncertainty"])
def test_sampling_variant_is_the_domain_mass_of_the_reweighting(objective):
    """w_d of dograph-sample = Σ_{i∈d} ω_i / Σ_i ω_i of dograph's factors on the same rows."""
    names = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    dom = np.repeat([0, 1, 2], [25, 12, 7])
    rows = (rng.normal(size=(3, 8)) * 3)[dom] * np.array([1.5, 1.0, 0.5])[dom, None] + rng.normal(size=(44, 8))
    snap = snapshot_from_per_sample(rows, dom, names, per_sample_loss=rng.uniform(1, 3, 44))
    r = build_strategy(_cfg(dograph_objective=objective), names, np.full(3, 1 / 3))
    s = build_strategy(_cfg(strategy="dograph-sample", dograph_objective=objective), names, np.full(3, 1 / 3))
    r.observe(snap)
    s.observe(snap)
    propose(r, 1)
    om = r.sample_factors(torch.tensor(rows, dtype=torch.float32)).double().numpy()
    mass = np.bincount(dom, weights=om, minlength=3)
    np.testing.assert_allclose(propose(s, 1), mass / mass.sum(), atol=1e-6)


def test_default_clusters_objective_and_registry():
    cfg = MixingConfig(strategy="dograph")
    assert cfg.dograph_objective == "uncertainty" and cfg.dograph_clusters == 0
    assert build_strategy(cfg, [f"d{i}" for i in range(4)], np.full(4, 0.25)).num_clusters() == 4
    many = [f"d{i}" for i in range(20)]
    s = build_strategy(_cfg(), many, np.full(20, 0.05))
    assert s.num_clusters() == PAPER_CLUSTERS == 11
    rng = np.random.default_rng(0)
    dom = np.repeat(np.arange(20), 5)
    s.observe(snapshot_from_per_sample(rng.normal(size=(100, 16)), dom, many))
    propose(s, 1)
    assert s.last_info["clusters"] == 11 and s.centroids.shape == (11, 16)
    assert isinstance(build_strategy(_cfg(strategy="dograph-sample"), ["a"], [1.0]), DoGraphSampleStrategy)
    assert isinstance(s, DoGraphStrategy) and isinstance(s, GradientReweighter) and s.ready
    assert not isinstance(build_strategy(_cfg(strategy="dograph-sample"), ["a"], [1.0]), GradientReweighter)


# ---------------------------------------------------------------------------------------- the cluster table
def test_sample_factors_nearest_centroid_ties_and_scale():
    s = build_strategy(_cfg(), ["a", "b"], [0.5, 0.5])
    assert s.sample_factors(torch.ones(2, 2)) is None        # no clusters before the first refresh
    s.set_clusters([[1.0, 0.0], [0.0, 1.0]], [0.3, 0.7], [0.6, 0.4])
    g = torch.tensor([[5.0, 1.0], [0.001, 0.002], [3.0, 3.0], [0.0, 0.0]])
    # cosine: scale does not matter; the tie (3, 3) and the zero row go to the lowest index
    torch.testing.assert_close(s.sample_factors(g), torch.tensor([0.5, 1.75, 0.5, 0.5]))
    with pytest.raises(ValueError):
        s.sample_factors(torch.ones(2, 3))
    with pytest.raises(ValueError):
        s.set_clusters([[1.0, 0.0]], [0.5], [0.0])


def test_state_dict_keeps_clusters_and_fallback_keeps_them():
    rows, dom, _, loss = _cross_domain_rows(1)
    a = build_strategy(_cfg(dograph_clusters=2), ["a", "b"], [0.5, 0.5])
    a.observe(snapshot_from_per_sample(rows, dom, ["a", "b"], per_sample_loss=loss))
    propose(a, 1)
    sd = json.loads(json.dumps(a.state_dict()))
    b = build_strategy(_cfg(dograph_clusters=2), ["a", "b"], [0.5, 0.5])
    b.load_state_dict(sd)
    np.testing.assert_array_equal(b.centroids, a.centroids)
    np.testing.assert_array_equal(b.cluster_weights, a.cluster_weights)
    g = torch.tensor(rows, dtype=torch.float32)
    assert torch.equal(a.sample_factors(g), b.sample_factors(g))
    bad = snapshot_from_per_sample(rows, dom, ["a", "b"])
    bad.per_sample[:] = np.nan
    before = a.centroids.copy()
    a.observe(bad)
    propose(a, 2)
    assert "no (finite) per-sample" in a.last_info["fallback"]
    np.testing.assert_array_equal(a.centroids, before)


def test_rows_are_clustered_in_key_order():
    """Rows that arrive in another order (another rank layout) with the same keys give the same table."""
    rows, dom, _, loss = _cross_domain_rows(2)
    keys = np.random.default_rng(3).permutation(len(dom)).astype(np.int64)
    perm = np.random.default_rng(4).permutation(len(dom))
    out = []
    for order in (np.arange(len(dom)), perm):
        snap = snapshot_from_per_sample(rows[order], dom[order], ["a", "b"], per_sample_loss=loss[order])
        snap.extra["per_sample_keys"] = keys[order]
        s = build_strategy(_cfg(dograph_clusters=3, dograph_objective="variance"), ["a", "b"], [0.5, 0.5])
        s.observe(snap)
        propose(s, 1)
        out.append((s.centroids, s.cluster_weights, s.cluster_shares))
    for x, y in zip(*out):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------- exact vs projected
V, DH, T = 256, 32, 16
COUNTS, SCALE = (28, 14, 6), (1.5, 1.0, 0.5)
NAMES = ["x", "y", "z"]
TOL = {"variance": 0.12, "robust": 0.10, "alignment": 0.12, "uncertainty": 0.20}


@functools.lru_cache(maxsize=None)
def _data(seed):
    """A tiny LM head: each domain has its own hidden mean and scale and its own band of target tokens."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, DH, generator=g) * 0.3
    mu = torch.randn(len(COUNTS), DH, generator=g) * 3.0
    dom = torch.arange(len(COUNTS)).repeat_interleave(torch.tensor(COUNTS))
    B = len(dom)
    h = torch.tensor(SCALE)[dom].repeat_interleave(T)[:, None] * (mu[dom].repeat_interleave(T, 0)
                                                                  + torch.randn(B * T, DH, generator=g))
    band = V // len(COUNTS)
    lab = torch.stack([torch.randint(int(d) * band, (int(d) + 1) * band, (T,), generator=g) for d in dom]).reshape(-1)
    G = exact_lm_head_grads(h, W, lab, torch.arange(B).repeat_interleave(T), B)
    loss = F.cross_entropy(h @ W.t(), lab, reduction="none").reshape(B, T).mean(1).double().numpy()
    return dom.numpy(), G, loss


def _update_mass(objective, rows, dom, loss):
    """Per-domain share of the reweighted update, Σ_{i∈d} w_i / Σ_i w_i, after a refresh on ``rows``."""
    s = build_strategy(_cfg(dograph_objective=objective), NAMES, np.full(3, 1 / 3))
    s.observe(snapshot_from_per_sample(rows, dom, NAMES, per_sample_loss=loss))
    propose(s, 1)
    om = s.sample_factors(torch.as_tensor(rows, dtype=torch.float32)).double().numpy()
    m = np.bincount(dom, weights=om, minlength=3)
    return m / m.sum()


@functools.lru_cache(maxsize=None)
def _exact_mass(objective, data_seed):
    dom, G, loss = _data(data_seed)
    return _update_mass(objective, G.reshape(len(dom), -1).numpy(), dom, loss)


def _errors(objective, make_rows, seeds):
    worst = []
    for data_seed in (1, 2):
        dom, G, loss = _data(data_seed)
        exact = _exact_mass(objective, data_seed)
        for s in seeds:
            worst.append(float(np.abs(_update_mass(objective, make_rows(G, s), dom, loss) - exact).max()))
    return worst


def _projected(G, seed):
    return make_projection(V, DH, 32, 32, seed=seed, dtype=torch.float64).project_dense(G).numpy()


def _noise(G, seed):
    """A 'projection' that is pure noise: rows with the projected rows' shape and scale, no information."""
    return np.random.default_rng(100 + seed).normal(size=(G.shape[0], 32 * 32)) * float(_projected(G, 0).std())


@pytest.mark.parametrize("objective", list(TOL))
def test_projected_weights_agree_with_exact(objective):
    worst = max(_errors(objective, _projected, range(4)))
    assert worst < TOL[objective], worst


@pytest.mark.parametrize("objective", list(TOL))
def test_noise_projection_fails_the_tolerance(objective):
    """The same comparison with pure-noise rows misses every objective's tolerance: the test above can fail."""
    best = min(_errors(objective, _noise, range(2)))
    assert best > TOL[objective], best

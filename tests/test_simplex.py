"""megamix.simplex: the one toolbox for weight vectors (normalise, validate, EMA, floor, projections,
drift bound)."""
import numpy as np
import pytest
from scipy.optimize import minimize

from megamix import simplex


def test_normalize_is_idempotent_bit_for_bit():
    rng = np.random.default_rng(0)
    for d in (1, 2, 3, 7, 50, 1000):
        for _ in range(50):
            x = rng.gamma(0.3, size=d) * 10.0 ** rng.uniform(-8, 8)
            w = simplex.normalize(x)
            assert abs(sum(w.tolist()) - 1) < 1e-12 and w.min() >= 0
            np.testing.assert_array_equal(simplex.normalize(w), w)
    w = np.array([0.4, 0.3, 0.2, 0.1])
    out = simplex.normalize(w)
    assert out is not w and out.tolist() == w.tolist()  # a copy with the same bits


@pytest.mark.parametrize("w, msg", [
    ([0.5, -0.1, 0.6], "negative: \\['b=-0.1'\\]"),
    ([0.5, float("nan"), 0.5], "finite; NaN/inf for \\['b'\\]"),
    ([0.5, 0.5], "expected 3 weights"),
    ([[0.5, 0.5, 0.0]], "expected 3 weights"),
    ([0.0, 0.0, 0.0], "all zero"),
    (["x", "y", "z"], "numbers"),
])
def test_normalize_errors_name_the_domains(w, msg):
    with pytest.raises(ValueError, match=msg):
        simplex.normalize(w, 3, ["a", "b", "c"])


def test_validate():
    np.testing.assert_array_equal(simplex.validate([0.25, 0.75]), [0.25, 0.75])
    assert simplex.validate([0.5, 0.5 + 1e-7]).tolist() == [0.5, 0.5 + 1e-7]  # within atol, unscaled
    with pytest.raises(ValueError, match="sum to 1"):
        simplex.validate([0.5, 0.6])
    with pytest.raises(ValueError, match="1-D"):
        simplex.validate([[1.0]])
    with pytest.raises(ValueError, match="empty"):
        simplex.validate([])


def test_softmax_ema_floor():
    np.testing.assert_allclose(simplex.softmax([0.0, np.log(3.0)]), [0.25, 0.75])
    np.testing.assert_allclose(simplex.ema([1.0, 0.0], [0.0, 1.0], 0.75), [0.25, 0.75])
    np.testing.assert_array_equal(simplex.ema([0.3, 0.7], [0.9, 0.1], 0.0), [0.3, 0.7])
    with pytest.raises(ValueError, match="decay"):
        simplex.ema([1.0], [1.0], 1.0)
    w = simplex.floor([0.9, 0.09, 0.01, 0.0], 0.05)
    assert w.min() >= 0.05 - 1e-12 and abs(w.sum() - 1) < 1e-12
    assert w[0] / w[1] == pytest.approx(0.9 / 0.09)
    np.testing.assert_array_equal(simplex.floor(w, 0.05), w)  # a floored vector is a fixed point
    with pytest.raises(ValueError, match="infeasible"):
        simplex.floor(np.full(4, 0.25), 0.3)


def _qp(y, lo, hi):
    """Reference: argmin ||x - y||² s.t. lo <= x <= hi, Σx = 1 (SLSQP)."""
    res = minimize(lambda x: np.sum((x - y) ** 2), np.clip(np.full(len(y), 1 / len(y)), lo, hi),
                   jac=lambda x: 2 * (x - y), bounds=list(zip(lo, hi)), method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}], options={"ftol": 1e-14})
    return res.x


@pytest.mark.parametrize("seed", range(5))
def test_projections_match_a_qp_solver(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=6)
    p = simplex.project(y)
    np.testing.assert_allclose(p, _qp(y, np.zeros(6), np.ones(6)), atol=1e-6)
    np.testing.assert_allclose(simplex.project_capped(y), p, atol=1e-12)
    lo, hi = rng.uniform(0, 0.1, 6), rng.uniform(0.2, 0.5, 6)
    x = simplex.project_capped(y, upper=hi, lower=lo)
    assert abs(x.sum() - 1) < 1e-12 and np.all(x >= lo) and np.all(x <= hi)
    np.testing.assert_allclose(x, _qp(y, lo, hi), atol=1e-6)
    with pytest.raises(ValueError, match="empty feasible set"):
        simplex.project_capped(y, upper=np.full(6, 0.1))
    with pytest.raises(ValueError, match="finite"):
        simplex.project([np.nan, 1.0])


def test_drift_box_and_max_drift_checks():
    lo, hi = simplex.drift_box([0.05, 0.15, 0.8], 0.1)
    np.testing.assert_allclose(lo, [0.0, 0.05, 0.7])
    np.testing.assert_allclose(hi, [0.15, 0.25, 0.9])
    assert simplex.check_max_drift(None) is None and simplex.check_max_drift(1) == 1.0
    for bad in (0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="max_drift"):
            simplex.check_max_drift(bad)


@pytest.mark.parametrize("seed", range(10))
def test_bound_drift_keeps_box_and_floor(seed):
    rng = np.random.default_rng(seed)
    d = 5
    prior = simplex.normalize(rng.uniform(0.05, 1.0, d))
    md, floor = 0.05, 0.03
    w = simplex.floor(simplex.softmax(20 * rng.normal(size=d)), floor)
    x = simplex.bound_drift(w, prior, md, floor)
    lo, hi = simplex.drift_box(prior, md)
    assert abs(sum(x.tolist()) - 1) < 1e-12
    assert np.all(x >= lo - 1e-12) and np.all(x <= hi + 1e-12)
    assert np.all(x >= np.minimum(floor, hi) - 1e-12)  # the floor wherever the box allows it
    np.testing.assert_allclose(x, _qp(w, np.maximum(lo, np.minimum(floor, hi)), hi), atol=1e-6)
    np.testing.assert_array_equal(simplex.bound_drift(x, prior, md, floor), x)  # inside: unchanged
    np.testing.assert_array_equal(simplex.normalize(x), x)  # the loader keeps these exact bits


def test_bound_drift_when_floor_and_box_conflict():
    # the prior keeps domain 0 at >= 0.55, so domains 1 and 2 cannot both reach the 0.3 floor:
    # the box wins and the floor drops to the largest value that fits (0.225 each)
    prior = np.array([0.8, 0.1, 0.1])
    x = simplex.bound_drift(simplex.floor([0.34, 0.33, 0.33], 0.3), prior, 0.25, 0.3)
    np.testing.assert_allclose(x, [0.55, 0.225, 0.225], atol=1e-9)
    # a domain whose prior + max_drift is below the floor sits at prior + max_drift
    x = simplex.bound_drift([0.2, 0.4, 0.4], [0.01, 0.49, 0.5], 0.02, 0.1)
    assert x[0] == pytest.approx(0.03) and abs(x.sum() - 1) < 1e-12


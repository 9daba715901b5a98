"""R&B Balance, the shared guards, strategy life cycle, invariances and state_dict round trips."""
import json

import numpy as np
import pytest

from megamix import simplex
from megamix.config import MixingConfig
from megamix.configbase import ConfigError
from megamix.snapshot import load_snapshot_npz, merge_snapshots, save_snapshot_npz
from megamix.strategies import DoGraphSampleStrategy, DoGraphStrategy, RnBStrategy, StaticStrategy, build_strategy
from megamix.strategies.base import keep_inactive
from megamix.strategies.exact import snapshot_from_per_sample
from megamix.strategies.rnb import rnb_balance
from strategy_driver import in_force, propose

NAMES = ["a", "b", "c", "d"]


def _snap(seed=0, n_per=(20, 20, 20, 20), k=16, step=10, names=NAMES, sep=1.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(names), k)) * sep + rng.normal(size=k)
    dom = np.repeat(np.arange(len(names)), n_per)
    g = centers[dom] + 0.5 * rng.normal(size=(len(dom), k))
    return snapshot_from_per_sample(g, dom, names, step=step, per_sample_loss=rng.uniform(1, 3, len(dom)))


def _cfg(**kw):
    kw.setdefault("min_weight", 0.0)
    return MixingConfig(**kw)


def test_rnb_matches_formula():
    snap = _snap()
    p0 = np.array([0.1, 0.2, 0.3, 0.4])
    s = build_strategy(_cfg(strategy="rnb", rnb_lambda=2.0), NAMES, p0)
    s.observe(snap)
    w = propose(s, 10)
    m = snap.sums / snap.counts[:, None]
    gp = (m @ m.T) @ p0
    z = 2.0 * gp / np.linalg.norm(gp)
    expect = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(w, expect, atol=1e-12)
    np.testing.assert_array_equal(in_force(s), w)


def test_rnb_unnormalised_option_and_lambda_sharpness():
    m = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    p = np.array([0.6, 0.2, 0.2])
    w1, _ = rnb_balance(m, p, 1.0)
    w10, _ = rnb_balance(m, p, 10.0)
    assert w10.max() > w1.max()
    wu, gp = rnb_balance(m, p, 1.0, normalize=False)
    np.testing.assert_allclose(np.log(wu) - np.log(wu).mean(), gp - gp.mean(), atol=1e-12)


def test_rnb_eval_variant_uses_eval_gradients():
    snap = _snap()
    # eval gradient equal to domain c's train mean -> c gets the largest weight
    mc = snap.sums[2] / snap.counts[2]
    snap.eval_sums = np.stack([mc * 3] * 4)
    snap.extra["eval_counts"] = np.array([3.0, 3.0, 3.0, 3.0])
    s = build_strategy(_cfg(strategy="rnb", rnb_lambda=5.0), NAMES, np.full(4, 0.25))
    s.observe(snap)
    w = propose(s, 10)
    assert np.argmax(w) == 2 and s.last_info["target"] == "eval"
    # switched off: train Gram instead
    s2 = build_strategy(_cfg(strategy="rnb", rnb_lambda=5.0, rnb_use_eval=False), NAMES, np.full(4, 0.25))
    s2.observe(snap)
    assert propose(s2, 10).tolist() != w.tolist() and s2.last_info["target"] == "train"


def test_rnb_eval_group_without_points_is_dropped_and_all_empty_falls_back():
    snap = _snap()
    snap.eval_sums = np.zeros((4, snap.sums.shape[1]))
    snap.eval_sums[1] = snap.sums[1]
    snap.extra["eval_counts"] = np.array([0.0, 5.0, 0.0, 0.0])
    s = build_strategy(_cfg(strategy="rnb"), NAMES, np.full(4, 0.25))
    s.observe(snap)
    w = propose(s, 10)
    assert s.last_info["eval_dropped"] == 3 and "fallback" not in s.last_info
    assert abs(w.sum() - 1) < 1e-12
    snap.extra["eval_counts"] = np.zeros(4)  # the paper's NaN case: no eval points anywhere
    s.observe(snap)
    w2 = propose(s, 20)
    np.testing.assert_allclose(w2, w)
    assert "eval" in s.last_info["fallback"]


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_rnb_zero_or_nan_gram_keeps_previous(bad):
    snap = _snap()
    snap.sums[:] = 0.0 if bad == "zero" else np.nan
    p0 = np.array([0.1, 0.2, 0.3, 0.4])
    s = build_strategy(_cfg(strategy="rnb"), NAMES, p0)
    s.observe(snap)
    np.testing.assert_allclose(propose(s, 10), p0)
    assert s.last_info["fallback"]


def test_min_count_keeps_previous_weight():
    snap = _snap(n_per=(20, 2, 20, 20))
    p0 = np.array([0.1, 0.2, 0.3, 0.4])
    for strat in ("rnb", "dograph-sample"):
        s = build_strategy(_cfg(strategy=strat, min_count=5), NAMES, p0)
        s.observe(snap)
        w = propose(s, 10)
        assert w[1] == pytest.approx(0.2)
        assert s.last_info["kept_previous"] == ["b"]
        assert abs(w.sum() - 1) < 1e-12


def test_unseen_domain_keeps_previous_and_single_domain():
    snap = _snap(n_per=(20, 0, 20, 20))
    s = build_strategy(_cfg(strategy="rnb"), NAMES, np.full(4, 0.25))
    s.observe(snap)
    assert propose(s, 10)[1] == pytest.approx(0.25)
    one = _snap(n_per=(10,), names=["only"])
    for strat in ("rnb", "dograph", "dograph-sample"):
        s1 = build_strategy(_cfg(strategy=strat), ["only"], [1.0])
        s1.observe(one)
        np.testing.assert_allclose(propose(s1, 5), [1.0])


def test_floor_and_ema():
    w = simplex.floor(np.array([0.9, 0.09, 0.01, 0.0]), 0.05)
    assert w.min() >= 0.05 - 1e-12 and abs(w.sum() - 1) < 1e-12
    assert w[0] / w[1] == pytest.approx(0.9 / 0.09)
    with pytest.raises(ValueError):
        simplex.floor(np.full(4, 0.25), 0.3)
    np.testing.assert_allclose(simplex.ema(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.75), [0.25, 0.75])
    np.testing.assert_allclose(keep_inactive(np.array([0.5, 0.0, 0.5]), np.array([0.2, 0.6, 0.2]),
                                             np.array([True, False, True])), [0.2, 0.6, 0.2])
    snap = _snap()
    s = build_strategy(_cfg(strategy="rnb", rnb_lambda=50.0, min_weight=0.1, ema=0.5), NAMES,
                       np.full(4, 0.25))
    s.observe(snap)
    w = propose(s, 10)
    raw = np.asarray(s.last_info["raw"])
    np.testing.assert_allclose(w, simplex.floor(0.5 * raw + 0.5 * 0.25, 0.1))
    assert w.min() >= 0.1 - 1e-12


def test_infeasible_floor_is_a_config_error():
    with pytest.raises(ConfigError):
        build_strategy(MixingConfig(strategy="rnb", min_weight=0.3), NAMES, np.full(4, 0.25))
    with pytest.raises(ConfigError):
        build_strategy(MixingConfig(strategy="nope"), NAMES, np.full(4, 0.25))


@pytest.mark.parametrize("strat,obj", [("rnb", "variance"), ("dograph-sample", "variance"),
                                       ("dograph-sample", "robust"), ("dograph-sample", "alignment"),
                                       ("dograph-sample", "uncertainty")])
def test_domain_permutation_permutes_weights(strat, obj):
    snap = _snap(seed=4, sep=3.0)
    p0 = np.array([0.1, 0.2, 0.3, 0.4])
    perm = np.array([2, 0, 3, 1])  # new domain j is old domain perm[j]
    inv = np.argsort(perm)
    names_p = [NAMES[i] for i in perm]
    rows = np.random.default_rng(1).permutation(len(snap.per_sample_domain))  # sample order too
    g, dom = snap.per_sample[rows], snap.per_sample_domain[rows]
    snap_p = snapshot_from_per_sample(g, inv[dom], names_p, step=10,
                                      per_sample_loss=snap.extra["per_sample_loss"][rows])
    cfg = _cfg(strategy=strat, dograph_objective=obj, rnb_lambda=3.0)
    s = build_strategy(cfg, NAMES, p0)
    sp = build_strategy(cfg, names_p, p0[perm])
    s.observe(snap)
    sp.observe(snap_p)
    np.testing.assert_allclose(propose(sp, 10), propose(s, 10)[perm], atol=1e-9)


def test_static_never_changes():
    s = build_strategy(MixingConfig(strategy="static"), NAMES, [0.7, 0.1, 0.1, 0.1])
    s.observe(_snap())
    np.testing.assert_allclose(propose(s, 10), [0.7, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(propose(s, 20), [0.7, 0.1, 0.1, 0.1])
    assert isinstance(s, StaticStrategy)


def test_propose_without_observe_is_unchanged_and_domain_mismatch_errors():
    s = build_strategy(_cfg(strategy="rnb"), NAMES, np.full(4, 0.25))
    np.testing.assert_allclose(propose(s, 10), np.full(4, 0.25))
    with pytest.raises(ValueError, match="domains"):
        s.observe(_snap(n_per=(5, 5), names=["x", "y"]))
    d = build_strategy(_cfg(strategy="dograph"), NAMES, np.full(4, 0.25))
    snap = _snap()
    snap.per_sample = None
    with pytest.raises(ValueError, match="per-sample"):
        d.observe(snap)


@pytest.mark.parametrize("strat", ["rnb", "dograph", "dograph-sample", "static"])
def test_state_dict_round_trip_and_resume(strat):
    cfg = _cfg(strategy=strat, ema=0.3, min_weight=0.02)
    a = build_strategy(cfg, NAMES, np.full(4, 0.25))
    for r in range(2):
        a.observe(_snap(seed=r))
        propose(a, 10 * (r + 1))
    a.observe(_snap(seed=7))  # pending, not yet proposed
    sd = json.loads(json.dumps(a.state_dict()))  # must be JSON-serialisable
    b = build_strategy(cfg, NAMES, np.full(4, 0.25))
    b.load_state_dict(sd)
    assert b.rounds == a.rounds and "history" not in sd and "weights" not in sd   # the loader owns the weights
    cur = in_force(a)           # a resume hands the restored strategy the loader's restored weights
    wa, wb = a.propose(30, cur), b.propose(30, cur)
    np.testing.assert_array_equal(wa, wb)
    a.observe(_snap(seed=9))
    b.observe(_snap(seed=9))
    np.testing.assert_array_equal(a.propose(40, wa), b.propose(40, wb))
    other = build_strategy(_cfg(strategy="rnb" if strat != "rnb" else "dograph"), NAMES, np.full(4, 0.25))
    with pytest.raises(ValueError):
        other.load_state_dict(sd)


def test_merge_snapshots_adds_rounds():
    a, b = _snap(seed=1), _snap(seed=2, step=20)
    m = merge_snapshots(a, b)
    np.testing.assert_allclose(m.counts, a.counts + b.counts)
    np.testing.assert_allclose(m.sums, a.sums + b.sums)
    assert m.per_sample.shape[0] == a.per_sample.shape[0] + b.per_sample.shape[0] and m.step == 20


def test_snapshot_npz_round_trip(tmp_path):
    snap = _snap()
    snap.eval_sums = snap.sums[:2].copy()
    snap.extra["eval_counts"] = np.array([3.0, 4.0])
    p = save_snapshot_npz(snap, tmp_path / "s.npz")
    back = load_snapshot_npz(p)
    assert back.domain_names == NAMES and back.step == snap.step
    for f in ("counts", "sums", "gram", "per_sample", "per_sample_domain", "eval_sums"):
        np.testing.assert_allclose(getattr(back, f), getattr(snap, f))
    np.testing.assert_allclose(back.extra["eval_counts"], [3.0, 4.0])
    np.savez(tmp_path / "bad.npz", counts=np.ones(2))
    with pytest.raises(ValueError, match="sums"):
        load_snapshot_npz(tmp_path / "bad.npz")


def test_dograph_favours_low_variance_cluster_with_uncertainty():
    rng = np.random.default_rng(0)
    k = 8
    c = np.eye(k)[:2] * 20
    dom = np.repeat([0, 1], 40)
    noise = np.where(dom[:, None] == 0, 0.2, 2.0)
    g = c[dom] + noise * rng.normal(size=(80, k))
    snap = snapshot_from_per_sample(g, dom, ["calm", "noisy"])
    s = build_strategy(_cfg(strategy="dograph-sample", dograph_objective="uncertainty"), ["calm", "noisy"],
                       [0.5, 0.5])
    s.observe(snap)
    w = propose(s, 1)
    assert w[0] > 0.9 and s.last_info["cluster_sizes"] == [40, 40]


def test_dograph_fewer_samples_than_clusters_and_nonfinite_rows():
    snap = _snap(n_per=(1, 1, 0, 0))
    s = build_strategy(_cfg(strategy="dograph-sample", dograph_clusters=6), NAMES, np.full(4, 0.25))
    s.observe(snap)
    w = propose(s, 1)
    assert s.last_info["clusters"] == 2 and abs(w.sum() - 1) < 1e-12
    np.testing.assert_allclose(w[2:], [0.25, 0.25])
    snap = _snap()
    snap.per_sample[:] = np.nan
    s.observe(snap)
    np.testing.assert_allclose(propose(s, 2), w)
    assert "no (finite) per-sample" in s.last_info["fallback"]


def test_strategy_classes():
    assert isinstance(build_strategy(_cfg(strategy="rnb"), NAMES, np.full(4, .25)), RnBStrategy)
    assert isinstance(build_strategy(_cfg(strategy="dograph"), NAMES, np.full(4, .25)), DoGraphStrategy)
    assert isinstance(build_strategy(_cfg(strategy="dograph-sample"), NAMES, np.full(4, .25)), DoGraphSampleStrategy)


def test_dograph_robust_upweights_high_loss_cluster():
    rng = np.random.default_rng(0)
    k = 8
    dom = np.repeat([0, 1], 30)
    g = (np.eye(k)[:2] * 5)[dom] + 0.3 * rng.normal(size=(60, k))
    loss = np.where(dom == 1, 4.0, 1.0)
    cfg = _cfg(strategy="dograph-sample", dograph_objective="robust", dograph_tau=1.0)
    # from per-sample losses
    s = build_strategy(cfg, ["easy", "hard"], [0.5, 0.5])
    s.observe(snapshot_from_per_sample(g, dom, ["easy", "hard"], per_sample_loss=loss))
    w = propose(s, 1)
    np.testing.assert_allclose(w, np.exp([1.0, 4.0]) / np.exp([1.0, 4.0]).sum(), atol=1e-9)
    # without per-sample losses the cluster's own loss is unknown: the round keeps the weights (the
    # average domain loss of a cluster's members is not its loss)
    snap = snapshot_from_per_sample(g, dom, ["easy", "hard"], per_sample_loss=loss)
    snap.extra.pop("per_sample_loss")
    s2 = build_strategy(cfg, ["easy", "hard"], [0.5, 0.5])
    s2.observe(snap)
    np.testing.assert_allclose(propose(s2, 1), [0.5, 0.5])
    assert "per-sample train loss" in s2.last_info["fallback"]


# ----------------------------------------------------------------------------- fixtures that can fail
UNEQUAL = (5, 30, 12, 50)


def test_rnb_divides_sums_by_counts_with_unequal_counts():
    """With unequal counts, Gram-of-sums and Gram-of-means give different updates: the fixture
    tells them apart (a planted 'forgot to divide by counts' bug fails here)."""
    snap = _snap(n_per=UNEQUAL)
    p0 = np.array([0.1, 0.2, 0.3, 0.4])
    s = build_strategy(_cfg(strategy="rnb", rnb_lambda=2.0), NAMES, p0)
    s.observe(snap)
    w = propose(s, 10)
    m = snap.sums / snap.counts[:, None]
    expect, _ = rnb_balance(m, p0, 2.0)
    np.testing.assert_allclose(w, expect, atol=1e-12)
    wrong, _ = rnb_balance(snap.sums, p0, 2.0)  # the bug: raw sums
    assert np.abs(wrong - expect).max() > 0.05


def test_rnb_eval_target_weights_eval_groups_by_p():
    """Eval target = Σ_j p_j ē_j with ē_j = eval_sums_j / eval_counts_j, distinct per group and with
    unequal counts: ignoring p, or the counts, changes the answer."""
    snap = _snap(n_per=UNEQUAL)
    rng = np.random.default_rng(7)
    ev_means = rng.normal(size=(4, snap.sums.shape[1])) * 2.0
    ec = np.array([2.0, 9.0, 4.0, 1.0])
    snap.eval_sums = ev_means * ec[:, None]
    snap.extra["eval_counts"] = ec
    p0 = np.array([0.55, 0.05, 0.1, 0.3])
    s = build_strategy(_cfg(strategy="rnb", rnb_lambda=3.0), NAMES, p0)
    s.observe(snap)
    w = propose(s, 10)
    m = snap.sums / snap.counts[:, None]
    expect, _ = rnb_balance(m, p0, 3.0, target=p0 @ ev_means)
    np.testing.assert_allclose(w, expect, atol=1e-12)
    ignore_p, _ = rnb_balance(m, p0, 3.0, target=ev_means.mean(0))
    ignore_counts, _ = rnb_balance(m, p0, 3.0, target=p0 @ snap.eval_sums)
    assert np.abs(ignore_p - expect).max() > 0.02 and np.abs(ignore_counts - expect).max() > 0.02


def test_rnb_hand_computed():
    # ḡ_1 = [1, 0], ḡ_2 = [1, 1], p = [1/2, 1/2], λ = 1:
    # Σ p_j ḡ_j = [1, 1/2]; Gp = [1, 3/2]; ‖Gp‖ = √3.25 = 1.8027756; z = [0.5547002, 0.8320503]
    # softmax(z) = [1 / (1 + e^(z2 - z1)), ...] with z2 - z1 = 0.2773501: [0.4311036, 0.5688964]
    w, gp = rnb_balance(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([0.5, 0.5]), 1.0)
    np.testing.assert_allclose(gp, [1.0, 1.5])
    np.testing.assert_allclose(w, [0.4311036, 0.5688964], atol=1e-7)


def test_rnb_is_the_paper_and_rnb_damped_is_named():
    """rnb: no EMA and no floor by default, so a sharp update may go below 1%; rnb-damped applies EMA
    0.5 and the 0.02 floor; explicit settings override either default."""
    snap = _snap(n_per=UNEQUAL, sep=3.0)
    p0 = np.full(4, 0.25)
    paper = build_strategy(MixingConfig(strategy="rnb", rnb_lambda=30.0), NAMES, p0)
    paper.observe(snap)
    w = propose(paper, 10)
    m = snap.sums / snap.counts[:, None]
    raw, _ = rnb_balance(m, p0, 30.0)
    np.testing.assert_allclose(w, raw, atol=1e-12)
    assert w.min() < 0.01 and (paper.ema, paper.min_weight) == (0.0, 0.0)
    damped = build_strategy(MixingConfig(strategy="rnb-damped", rnb_lambda=30.0), NAMES, p0)
    damped.observe(snap)
    np.testing.assert_allclose(propose(damped, 10), simplex.floor(0.5 * raw + 0.5 * p0, 0.02), atol=1e-12)
    assert isinstance(damped, RnBStrategy) and damped.name == "rnb-damped"
    explicit = build_strategy(MixingConfig(strategy="rnb-damped", ema=0.0, min_weight=0.0, rnb_lambda=30.0),
                              NAMES, p0)
    explicit.observe(snap)
    np.testing.assert_allclose(propose(explicit, 10), raw, atol=1e-12)
    with pytest.raises(ConfigError, match="rnb-damped default"):
        build_strategy(MixingConfig(strategy="rnb-damped"), [f"d{i}" for i in range(60)], np.full(60, 1 / 60))


def test_the_registry_owns_the_strategy_names():
    from megamix.strategies import STRATEGIES, register_strategy

    with pytest.raises(ConfigError, match="mixing.strategy must be one of static, rnb"):
        build_strategy(MixingConfig(strategy="nope"), NAMES, np.full(4, 0.25))

    class Flat(StaticStrategy):
        name = "flat-test"

    with pytest.raises(ValueError, match="register it under that name"):
        register_strategy("flat", Flat, "x")
    register_strategy("flat-test", Flat, "a test strategy")
    try:
        assert isinstance(build_strategy(MixingConfig(strategy="flat-test"), NAMES, np.full(4, 0.25)), Flat)
    finally:
        del STRATEGIES["flat-test"]


def test_merge_snapshots_adds_eval_counts_so_means_stay_means():
    a, b = _snap(seed=1, n_per=UNEQUAL), _snap(seed=2, step=20, n_per=UNEQUAL)
    k = a.sums.shape[1]
    rng = np.random.default_rng(3)
    a.eval_sums, b.eval_sums = rng.normal(size=(4, k)), rng.normal(size=(4, k))
    a.extra["eval_counts"], b.extra["eval_counts"] = np.array([1.0, 2, 3, 4]), np.array([5.0, 1, 1, 2])
    m = merge_snapshots(a, b)
    np.testing.assert_allclose(m.extra["eval_counts"], [6, 3, 4, 6])
    np.testing.assert_allclose(m.eval_sums, a.eval_sums + b.eval_sums)
    # the strategy sees pooled eval means
    s = build_strategy(_cfg(strategy="rnb"), NAMES, np.full(4, 0.25))
    s.observe(a)
    s.observe(b)
    w = propose(s, 20)
    pooled = (a.eval_sums + b.eval_sums) / np.array([6.0, 3, 4, 6])[:, None]
    expect, _ = rnb_balance(m.sums / m.counts[:, None], np.full(4, 0.25), 1.0, target=np.full(4, 0.25) @ pooled)
    np.testing.assert_allclose(w, expect, atol=1e-12)
    # a later round without an eval pass keeps the earlier eval statistics intact
    c = _snap(seed=4, step=30, n_per=UNEQUAL)
    mc = merge_snapshots(a, c)
    np.testing.assert_allclose(mc.eval_sums, a.eval_sums)
    np.testing.assert_allclose(mc.extra["eval_counts"], a.extra["eval_counts"])
    # per-row extras follow the rows
    assert m.extra["per_sample_loss"].shape[0] == m.per_sample.shape[0]
    del b.extra["eval_counts"]
    with pytest.raises(ValueError, match="eval_counts"):
        merge_snapshots(a, b)


@pytest.mark.parametrize("strategy", ["dograph", "dograph-sample"])
@pytest.mark.parametrize("objective", ["variance", "robust", "alignment", "uncertainty"])
def test_dograph_keeps_weights_when_gradients_carry_no_signal(objective, strategy):
    """All-zero per-sample gradients (no signal) keep the previous weights, like R&B's zero Gp, instead of
    moving them toward the round's sample counts (here 70/10/10/10 against uniform weights)."""
    snap = _snap(n_per=(70, 10, 10, 10))
    snap.per_sample[:] = 0.0
    snap.sums[:] = 0.0
    s = build_strategy(_cfg(strategy=strategy, dograph_objective=objective), NAMES, np.full(4, 0.25))
    s.observe(snap)
    np.testing.assert_array_equal(propose(s, 1), np.full(4, 0.25))
    assert "no gradient signal" in s.last_info["fallback"]
    r = build_strategy(_cfg(strategy="rnb"), NAMES, np.full(4, 0.25))   # the same check, one owner
    r.observe(snap)
    np.testing.assert_array_equal(propose(r, 1), np.full(4, 0.25))
    assert "no gradient signal" in r.last_info["fallback"]

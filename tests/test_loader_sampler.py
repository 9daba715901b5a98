"""MixtureSampler: weights validation, exact allocation bounds, epochs, determinism and resume."""
import json
from fractions import Fraction

import numpy as np
import pytest

from megamix.loader.permutation import FeistelPermutation, PermutationCache, derive_key, feistel_many
from megamix.loader.sampler import (Q, DomainExhaustedError, MixtureSampler, WeightError, allocate,
                                    quantize_weights, validate_weights)


def run(s: MixtureSampler, steps: int, schedule=None):
    """Advance ``steps`` global batches, applying ``schedule[step]`` weights before that step."""
    out = []
    for _ in range(steps):
        if schedule and s.step in schedule:
            s.set_weights(schedule[s.step])
        g = s.next_global()
        out.append(np.stack([g.domains, g.indices, g.epochs]))
    return out


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("w, msg", [
    ([0.5, -0.1, 0.6], "negative"),
    ([0.5, float("nan"), 0.5], "finite"),
    ([0.5, float("inf"), 0.5], "finite"),
    ([0.5, 0.5], "expected 3 weights"),
    ([[0.5, 0.5, 0.0]], "expected 3 weights"),
    ([0.0, 0.0, 0.0], "all zero"),
    ([0.4, 0.3, 0.3], "empty domain"),
    (["a", "b", "c"], "numbers"),
])
def test_bad_weights_raise_clear_errors(w, msg):
    with pytest.raises(WeightError, match=msg):
        validate_weights(w, [10, 10, 0], ["a", "b", "c"])
    s = MixtureSampler([10, 10, 0], [1, 1, 0], global_batch_size=4, seed=0)
    before = s.state_dict()
    with pytest.raises(WeightError, match=msg):
        s.set_weights(w)
    assert s.state_dict() == before  # a rejected update changes nothing


def test_empty_domain_with_zero_weight_is_fine_and_never_drawn():
    s = MixtureSampler([10, 0, 7], [1, 0, 1], global_batch_size=3, seed=1)
    doms = np.concatenate([b[0] for b in run(s, 20)])
    assert set(doms.tolist()) == {0, 2}


def test_quantize_exact_sum_and_support():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.dirichlet(np.ones(7) * 0.3)
        w[rng.integers(7)] = 0
        w[rng.integers(7)] = 1e-13   # below 2^-32: still gets one unit
        w = w / w.sum()
        q = quantize_weights(w)
        assert q.sum() == Q and np.array_equal(q > 0, w > 0)
        assert np.all(np.abs(q / Q - w) <= 2.0 / Q)


def test_allocate_is_greedy_largest_deficit():
    rng = np.random.default_rng(1)
    for _ in range(200):
        D, B = int(rng.integers(1, 8)), int(rng.integers(1, 40))
        t = rng.integers(-Q, 6 * Q, size=D).astype(np.int64)
        active = rng.random(D) < 0.8
        active[rng.integers(D)] = True
        c = allocate(t, active, B)
        # reference: hand out units one at a time to the largest remaining deficit
        ref, v = np.zeros(D, np.int64), t.copy()
        for _ in range(B):
            cand = np.flatnonzero(active)
            d = cand[np.lexsort((cand, -v[cand]))[0]]
            ref[d] += 1
            v[d] -= Q
        assert np.array_equal(c, ref)


# ----------------------------------------------------------------------------- exactness bounds
def cumulative_target(history, steps, B):
    """Exact T_d(s) = sum_t B*q_d(t)/Q from the weight history (Fractions, independent code path)."""
    hist = sorted(history) + [(steps, None)]
    T = [Fraction(0)] * len(hist[0][1])
    for (s0, w), (s1, _) in zip(hist[:-1], hist[1:]):
        q = quantize_weights(np.asarray(w))
        T = [a + Fraction(int(B * x) * (min(s1, steps) - s0), Q) for a, x in zip(T, q)]
    return T


def test_fixed_weights_never_off_by_a_whole_sample():
    rng = np.random.default_rng(2)
    for trial in range(40):
        D, B = int(rng.integers(2, 10)), int(rng.integers(1, 70))
        s = MixtureSampler([5000] * D, rng.dirichlet(np.ones(D) * 0.5), global_batch_size=B, seed=trial)
        for _ in range(100):
            g = s.next_global()
            assert len(g.domains) == B
            assert np.abs(s.residuals).max() < 1.0
        T = cumulative_target(s.weight_history, 100, B)
        C = s.counts
        # identity C_d = T_d - e_d holds exactly
        assert all(Fraction(int(C[d])) == T[d] - Fraction(int(s._residual[d]), Q) for d in range(D))


def test_changing_weights_stay_within_proven_bound():
    rng = np.random.default_rng(3)
    for trial in range(30):
        D, B = int(rng.integers(2, 9)), int(rng.integers(1, 50))
        s = MixtureSampler([5000] * D, rng.dirichlet(np.ones(D)), global_batch_size=B, seed=trial)
        sched = {t: rng.dirichlet(np.ones(D) * 0.3) for t in range(0, 120, int(rng.integers(1, 7)))}
        run(s, 120, sched)
        T = cumulative_target(s.weight_history, 120, B)
        err = max(abs(float(T[d]) - s.counts[d]) for d in range(D))
        assert err < max(1, D - 1)          # proven: -1 < e_d and sum e = 0
        assert np.all(s.residuals > -1)
        assert err < 1                      # measured (not proven) for these histories


def test_weight_zero_domain_is_paid_back_later():
    s = MixtureSampler([1000] * 3, [0.34, 0.33, 0.33], global_batch_size=7, seed=0)
    sched = {5: [0.5, 0.5, 0.0], 30: [0.2, 0.3, 0.5], 60: [0.0, 0.0, 1.0]}
    batches = run(s, 100, sched)
    for t in range(5, 30):
        assert 2 not in batches[t][0].tolist()
    T = cumulative_target(s.weight_history, 100, 7)
    assert max(abs(float(T[d]) - s.counts[d]) for d in range(3)) < 2


# ----------------------------------------------------------------------------- epochs
def test_every_index_once_per_epoch_despite_weight_changes():
    sizes = [37, 11, 64, 5]
    rng = np.random.default_rng(4)
    s = MixtureSampler(sizes, [1, 1, 1, 1], global_batch_size=12, seed=9)
    sched = {t: rng.dirichlet(np.ones(4)) for t in range(0, 60, 3)}
    allb = np.concatenate(run(s, 60, sched), axis=1)
    for d, n in enumerate(sizes):
        sel = allb[0] == d
        idx, ep = allb[1][sel], allb[2][sel]
        for e in range(int(ep.max()) + 1):
            got = np.sort(idx[ep == e])
            if e < s.epochs[d] or (e == s.epochs[d] and s.cursors[d] == n):
                assert np.array_equal(got, np.arange(n)), (d, e)     # complete epoch: each index once
            else:
                assert len(np.unique(got)) == len(got) == s.cursors[d]  # partial epoch: no repeats
    assert s.epochs[3] >= 2  # the small domain really wrapped several times


def test_permutations_differ_between_epochs_and_domains():
    s = MixtureSampler([50, 50], [1, 0], global_batch_size=50, seed=0)
    a, b = s.next_global(), s.next_global()
    assert sorted(a.indices.tolist()) == list(range(50)) and not np.array_equal(a.indices, b.indices)
    assert b.epochs.tolist() == [1] * 50


def test_max_epochs_raises_and_leaves_state_untouched():
    s = MixtureSampler([5, 100], [1, 1], global_batch_size=4, seed=0, max_epochs=2, domain_names=["tiny", "big"])
    for _ in range(5):  # 10 samples of "tiny" = exactly 2 epochs
        s.next_global()
    before = s.state_dict()
    with pytest.raises(DomainExhaustedError, match="tiny.*max_epochs=2"):
        s.next_global()
    assert s.state_dict() == before
    s.set_weights([0, 1])  # dropping the exhausted domain lets training go on
    s.next_global()


# ----------------------------------------------------------------------------- determinism / resume
def test_stream_is_pure_function_of_seed_history_step():
    sched = {0: [0.5, 0.3, 0.2], 7: [0.1, 0.1, 0.8], 8: [0.3, 0.3, 0.4]}
    a = run(MixtureSampler([40, 70, 90], [1, 1, 1], global_batch_size=10, seed=5), 40, sched)
    b = run(MixtureSampler([40, 70, 90], [1, 1, 1], global_batch_size=10, seed=5), 40, sched)
    c = run(MixtureSampler([40, 70, 90], [1, 1, 1], global_batch_size=10, seed=6), 40, sched)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("world_before, world_after", [(1, 1), (4, 2), (2, 4), (1, 8)])
def test_resume_reproduces_uninterrupted_stream(world_before, world_after):
    sizes, B = [23, 51, 80, 9], 16
    sched_before = {0: [0.4, 0.3, 0.2, 0.1], 4: [0.1, 0.1, 0.1, 0.7]}
    sched_after = {13: [0.25, 0.25, 0.5, 0.0], 20: [0.3, 0.3, 0.3, 0.1]}
    ref = run(MixtureSampler(sizes, [1] * 4, global_batch_size=B, seed=3), 30, {**sched_before, **sched_after})

    def ranks(W):
        return [MixtureSampler(sizes, [1] * 4, global_batch_size=B, seed=3, rank=r, world_size=W) for r in range(W)]

    first = ranks(world_before)
    for s in first:
        run(s, 11, sched_before)
    ckpt = json.loads(json.dumps(first[0].state_dict()))  # any rank: the state is global
    assert all(s.state_dict() == ckpt for s in first)
    second = ranks(world_after)
    for s in second:
        s.load_state_dict(ckpt)
    for t in range(11, 30):
        parts = []
        for s in second:
            if t in sched_after:
                s.set_weights(sched_after[t])
            d, i, e = s.next_step_arrays()
            parts.append(np.stack([d, i, e]))
        assert np.array_equal(np.concatenate(parts, axis=1), ref[t]), t
    assert second[0].weight_history[:2] == [(0, [0.4, 0.3, 0.2, 0.1]), (4, [0.1, 0.1, 0.1, 0.7])]


def test_resume_refuses_changed_global_batch_seed_or_data():
    s = MixtureSampler([10, 20], [1, 1], global_batch_size=8, seed=0)
    run(s, 3)
    sd = s.state_dict()
    with pytest.raises(ValueError, match="global_batch_size=8 but this run uses 16"):
        MixtureSampler([10, 20], [1, 1], global_batch_size=16, seed=0).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([10, 20], [1, 1], global_batch_size=8, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="domain sizes"):
        MixtureSampler([10, 21], [1, 1], global_batch_size=8, seed=0).load_state_dict(sd)
    with pytest.raises(ValueError, match="divisible"):
        MixtureSampler([10, 20], [1, 1], global_batch_size=8, seed=0, world_size=3)


def test_ranks_are_disjoint_slices_of_the_global_batch():
    sizes, B, W = [30, 40, 50], 12, 4
    samplers = [MixtureSampler(sizes, [0.2, 0.3, 0.5], global_batch_size=B, seed=2, rank=r, world_size=W)
                for r in range(W)]
    ref = MixtureSampler(sizes, [0.2, 0.3, 0.5], global_batch_size=B, seed=2)
    seen = set()
    for _ in range(8):
        g = ref.next_global()
        parts = [s.next_step() for s in samplers]
        assert all(len(p) == B // W for p in parts)
        assert sum(parts, []) == list(zip(g.domains.tolist(), g.indices.tolist()))
        occ = [(d, i, e) for d, i, e in zip(g.domains.tolist(), g.indices.tolist(), g.epochs.tolist())]
        assert not seen & set(occ) and len(set(occ)) == B
        seen |= set(occ)


def test_per_rank_shares_match_weights_statistically():
    """Counts per global batch are exact; a rank's share is hypergeometric (random batch order).

    Tolerance: every (rank, domain) total is within 5 standard deviations of its expectation.
    """
    w = np.array([0.5, 0.3, 0.15, 0.05])
    B, W, steps = 64, 4, 300
    ss = [MixtureSampler([10**5] * 4, w, global_batch_size=B, seed=11, rank=r, world_size=W) for r in range(W)]
    tot = np.zeros((W, 4))
    var = np.zeros(4)
    ref = MixtureSampler([10**5] * 4, w, global_batch_size=B, seed=11)
    for _ in range(steps):
        K = ref.step_counts()
        ref.next_global()
        n = B // W
        var += n * (K / B) * (1 - K / B) * (B - n) / (B - 1)
        for r, s in enumerate(ss):
            tot[r] += np.bincount(s.next_step_arrays()[0], minlength=4)
    expect = steps * B / W * w
    z = np.abs(tot - expect) / np.sqrt(var)
    assert z.max() < 5, z
    assert np.abs(tot.sum(0) - steps * B * w).max() < 1  # exact overall


# ----------------------------------------------------------------------------- permutations, cost
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_feistel_is_a_bijection(n):
    p = FeistelPermutation(n, derive_key(1, 2, n))
    assert np.array_equal(np.sort(p.full()), np.arange(n))
    assert np.array_equal(p(np.arange(n)), p.full())


def test_caching_does_not_change_the_stream():
    sched = {0: [0.2, 0.8], 3: [0.7, 0.3]}
    a = run(MixtureSampler([300, 5000], [1, 1], global_batch_size=32, seed=4), 20, sched)
    b = run(MixtureSampler([300, 5000], [1, 1], global_batch_size=32, seed=4, cache_max_size=0), 20, sched)
    c = run(MixtureSampler([300, 5000], [1, 1], global_batch_size=32, seed=4, cache_budget_bytes=2000), 20, sched)
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))
    cache = PermutationCache(10, 100)
    assert np.array_equal(cache.lookup(8, 5, (0, 0), np.arange(8)), FeistelPermutation(8, 5)(np.arange(8)))


def test_set_weights_builds_nothing_and_huge_domains_work(monkeypatch):
    import megamix.loader.sampler as sm
    s = MixtureSampler([10**12, 10**11, 3], [1, 1, 1], global_batch_size=8, seed=0)
    s.next_global()
    calls = []
    orig_array, orig_many = sm.PermutationCache.array, sm.feistel_many
    monkeypatch.setattr(sm.PermutationCache, "array", lambda self, *a: calls.append(a) or orig_array(self, *a))
    monkeypatch.setattr(sm, "feistel_many", lambda *a: calls.append(a) or orig_many(*a))
    for k in range(100):
        s.set_weights([k + 1, 1, 1])
    assert calls == []  # a weight change touches no permutation
    g = s.next_global()
    assert calls and g.indices[g.domains == 0].max() < 10**12 and s._cache.nbytes < 100


def test_vectorised_feistel_matches_scalar():
    rng = np.random.default_rng(5)
    ns = np.asarray([1, 2, 5, 1000, 4097, 10**12], dtype=np.int64)
    keys = [derive_key(7, i) for i in range(len(ns))]
    which = rng.integers(0, len(ns), size=500)
    pos = (rng.random(500) * ns[which]).astype(np.int64)
    got = feistel_many(pos, ns[which], np.asarray(keys, dtype=np.uint64)[which])
    want = [FeistelPermutation(int(ns[w]), keys[w])(np.asarray([p]))[0] for w, p in zip(which, pos)]
    assert got.tolist() == want


def test_checksum_tracks_state():
    a = MixtureSampler([10, 20], [1, 1], global_batch_size=4, seed=0)
    b = MixtureSampler([10, 20], [1, 1], global_batch_size=4, seed=0)
    assert a.checksum() == b.checksum()
    b.set_weights([1, 2])
    assert a.checksum() != b.checksum()

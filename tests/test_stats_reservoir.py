"""DomainStats' bounded reservoir of per-sample rows (``max_rows``, what DoGraph refreshes its clusters
from): the R smallest keys of the round, never more than R rows held, and the same rows on 2 gloo ranks
as in one process over the same samples split differently."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ranks import free_port, spawn

from megamix.stats import DomainStats, sample_keys

D, K, R, SEED = 3, 5, 11, 7
STEPS, PER_STEP = 4, 8          # 32 samples per round, 11 kept


def _round(seed=0):
    """STEPS global batches of PER_STEP samples: (step, rows, domains, sample ids, loss sums, counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(1, STEPS + 1):
        out.append((step, torch.randn(PER_STEP, K, generator=g), torch.randint(0, D, (PER_STEP,), generator=g),
                    torch.randperm(1000, generator=g)[:PER_STEP], torch.rand(PER_STEP, generator=g) * 20,
                    torch.randint(1, 9, (PER_STEP,), generator=g).double()))
    return out


def _feed(st, batches, rows_slice, micro):
    """Feed this rank's slice of every step in micro-batches of ``micro`` samples; check the bound."""
    for step, g, dom, ids, ls, tc in batches:
        idx = torch.arange(PER_STEP)[rows_slice]
        for m in range(0, len(idx), micro):
            j = idx[m:m + micro]
            st.update(g[j], dom[j], sample_ids=ids[j], token_loss_sum=ls[j], token_count=tc[j],
                      keys=sample_keys(SEED, step, ids[j]))
            assert sum(r.shape[0] for r in st._rows) <= R


def _sorted(snap):
    o = np.argsort(snap.extra["per_sample_keys"], kind="stable")
    return (snap.per_sample[o], snap.per_sample_domain[o], snap.extra["per_sample_ids"][o],
            snap.extra["per_sample_loss"][o], snap.extra["per_sample_keys"][o])


def test_reservoir_keeps_the_smallest_keys_in_arrival_order():
    batches = _round()
    st = DomainStats(D, K, max_rows=R)
    _feed(st, batches, slice(None), micro=3)
    snap = st.snapshot(STEPS, list("abc"))
    keys = torch.cat([sample_keys(SEED, s, ids) for s, _, _, ids, _, _ in batches]).numpy()
    rows = torch.cat([g for _, g, *_ in batches]).numpy()
    keep = np.sort(np.argsort(keys, kind="stable")[:R])
    np.testing.assert_array_equal(snap.per_sample, rows[keep])
    np.testing.assert_array_equal(snap.extra["per_sample_keys"], keys[keep])
    ls = torch.cat([x[4] for x in batches]).numpy()
    tc = torch.cat([x[5] for x in batches]).numpy()
    np.testing.assert_allclose(snap.extra["per_sample_loss"], (ls / tc)[keep], rtol=1e-12)
    assert snap.counts.sum() == STEPS * PER_STEP          # the sums and counts still cover every sample
    # keys depend on (seed, step, sample id) only, and are non-negative int64
    assert torch.equal(sample_keys(SEED, 3, torch.tensor([5, 9])), sample_keys(SEED, 3, torch.tensor([5, 9])))
    assert not torch.equal(sample_keys(SEED, 3, torch.tensor([5])), sample_keys(SEED, 4, torch.tensor([5])))
    assert (torch.as_tensor(keys) >= 0).all()
    # resume mid-round: the state holds the reservoir exactly
    st2 = DomainStats(D, K, max_rows=R)
    st2.load_state_dict(st.state_dict())
    assert np.array_equal(st2.snapshot(1, list("abc")).per_sample, snap.per_sample)
    with pytest.raises(ValueError, match="dograph_reservoir"):
        DomainStats(D, K, max_rows=R + 1).load_state_dict(st.state_dict())


def _put(out_dir, rank, result) -> None:
    """The rank's result, for the parent (a file: a spawned rank leaves with os._exit, which a queue may not survive)."""
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        st = DomainStats(D, K, max_rows=R)
        half = PER_STEP // world
        _feed(st, _round(), slice(rank * half, (rank + 1) * half), micro=2)   # this rank's contiguous slice
        st.all_reduce()
        _put(out_dir, rank, (rank, _sorted(st.snapshot(STEPS, list("abc"))), st.snapshot(STEPS, list("abc")).sums))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_single_process_reservoir(tmp_path):
    spawn(_worker, (2, free_port(), str(tmp_path)), 2)
    res = {}
    for rank in range(2):
        r = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        res[r[0]] = r[1:]
    single = DomainStats(D, K, max_rows=R)
    _feed(single, _round(), slice(None), micro=8)
    ref = _sorted(single.snapshot(STEPS, list("abc")))
    assert len(ref[0]) == R
    for rank in (0, 1):
        got, sums = res[rank]
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)          # bit for bit: the same rows, keys and losses
        np.testing.assert_allclose(sums, single.snapshot(STEPS, list("abc")).sums, rtol=1e-12)


@pytest.mark.parametrize("keyed", [True, False])
def test_rollback_after_a_skipped_step_restores_the_reservoir_exactly(keyed):
    """The non-finite guard's discard_step: mark(), one more step (whose rows may shrink the reservoir),
    rollback() — the state equals never having seen that step, rows, keys, losses and counter included."""
    batches = _round(seed=3)

    def feed(st, bs):
        for step, g, dom, ids, ls, tc in bs:
            st.update(g, dom, sample_ids=ids, token_loss_sum=ls, token_count=tc,
                      keys=sample_keys(SEED, step, ids) if keyed else None)

    ref = DomainStats(D, K, max_rows=R, key_seed=SEED)
    feed(ref, batches[:2])
    st = DomainStats(D, K, max_rows=R, key_seed=SEED)
    feed(st, batches[:2])
    st.mark()
    feed(st, batches[2:])   # 16 more samples: the reservoir of 11 is shrunk again
    st.rollback()
    for a, b in zip(st._local_rows(), ref._local_rows()):
        assert torch.equal(a, b)
    assert st._counter == ref._counter and torch.equal(st.sums, ref.sums) and torch.equal(st.counts, ref.counts)
    # and the round goes on as if the step never happened
    feed(st, batches[3:])
    feed(ref, batches[3:])
    names = [f"d{i}" for i in range(D)]
    a, b = st.snapshot(9, names), ref.snapshot(9, names)
    np.testing.assert_array_equal(a.per_sample, b.per_sample)
    np.testing.assert_array_equal(a.extra["per_sample_loss"], b.extra["per_sample_loss"])

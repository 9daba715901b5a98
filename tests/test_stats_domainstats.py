"""DomainStats: accumulation across micro-steps, snapshot, state_dict, and a real 2-process gloo all_reduce."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ranks import free_port, spawn

from megamix.kernels.testing import domain_stats_ref
from megamix.stats import DomainStats

D, K = 4, 6


def _micro_steps(seed=0, steps=3, B=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        out.append(dict(g=torch.randn(B, K, generator=g),
                        domain_ids=torch.tensor([0, 1, 1, 3, 0][:B]),   # domain 2 is never seen
                        sample_ids=torch.arange(B) + 100 * s + 1000 * seed,
                        token_loss_sum=torch.rand(B, generator=g) * 10,
                        token_count=torch.randint(1, 20, (B,), generator=g).float()))
    return out


def _expected(steps):
    g = torch.cat([s["g"] for s in steps]).double()
    dom = torch.cat([s["domain_ids"] for s in steps])
    sums, gram, counts = domain_stats_ref(g, dom, D)
    losses = torch.cat([s["token_loss_sum"] for s in steps]).double()
    ls = torch.zeros(D, dtype=torch.float64).index_add_(0, dom, losses)
    tc = torch.zeros(D, dtype=torch.float64).index_add_(0, dom, torch.cat([s["token_count"] for s in steps]).double())
    return g, dom, sums, gram, counts, ls, tc


def test_update_snapshot_matches_reference():
    steps = _micro_steps()
    st = DomainStats(D, K)
    for s in steps:
        st.update(**s)
    snap = st.snapshot(7, ["a", "b", "c", "d"])
    g, dom, sums, gram, counts, ls, tc = _expected(steps)
    np.testing.assert_allclose(snap.sums, sums.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(snap.gram, gram.numpy(), rtol=1e-10, atol=1e-10)
    assert snap.counts.tolist() == counts.tolist() == [6, 6, 0, 3]
    assert np.isnan(snap.domain_loss[2])
    np.testing.assert_allclose(snap.domain_loss[[0, 1, 3]], (ls / tc).numpy()[[0, 1, 3]], rtol=1e-12)
    np.testing.assert_allclose(snap.per_sample, g.float().numpy())
    assert snap.per_sample_domain.tolist() == dom.tolist() and snap.step == 7


def test_state_dict_roundtrip_and_reset():
    steps = _micro_steps(seed=1)
    a = DomainStats(D, K)
    a.update(**steps[0])
    b = DomainStats(D, K)
    b.load_state_dict(a.state_dict())
    for s in steps[1:]:
        a.update(**s)
        b.update(**s)
    sa, sb = a.snapshot(1, list("abcd")), b.snapshot(1, list("abcd"))
    assert np.array_equal(sa.sums, sb.sums) and np.array_equal(sa.per_sample, sb.per_sample)
    a.reset()
    assert a.num_samples == 0 and a.snapshot(2, list("abcd")).per_sample.shape == (0, K)
    with pytest.raises(ValueError):
        DomainStats(3, K).load_state_dict(b.state_dict())


def test_rejects_bad_input():
    st = DomainStats(D, K)
    with pytest.raises(ValueError):
        st.update(torch.zeros(2, K + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        st.update(torch.zeros(2, K), torch.tensor([0, D]))
    with pytest.raises(ValueError):
        st.update(torch.zeros(2, K), torch.tensor([0, 1]), token_loss_sum=torch.zeros(2))
    st.all_reduce()   # single process: no-op but marks the round reduced
    with pytest.raises(RuntimeError):
        st.update(torch.zeros(2, K), torch.tensor([0, 1]))


def _put(out_dir, rank, result) -> None:
    """The rank's result, for the parent (a file: a spawned rank leaves with os._exit, which a queue may not survive)."""
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        st = DomainStats(D, K)
        for s in _micro_steps(seed=rank, steps=2 + rank):   # ranks see different numbers of samples
            st.update(**s)
        st.all_reduce()
        snap = st.snapshot(3, list("abcd"))
        _put(out_dir, rank, (rank, snap.sums, snap.gram, snap.counts, snap.domain_loss, snap.per_sample,
               snap.per_sample_domain, snap.extra["per_sample_ids"]))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_process_gloo_equals_single_process(tmp_path):
    spawn(_worker, (2, free_port(), str(tmp_path)), 2)
    results = {}
    for rank in range(2):
        r = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        results[r[0]] = r[1:]
    single = DomainStats(D, K)
    for seed, n in ((0, 2), (1, 3)):
        for s in _micro_steps(seed=seed, steps=n):
            single.update(**s)
    ref = single.snapshot(3, list("abcd"))
    for rank in (0, 1):
        sums, gram, counts, loss, rows, rdom, rids = results[rank]
        np.testing.assert_allclose(sums, ref.sums, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gram, ref.gram, rtol=1e-10, atol=1e-10)
        assert counts.tolist() == ref.counts.tolist()
        np.testing.assert_allclose(loss, ref.domain_loss, rtol=1e-12)
        np.testing.assert_allclose(rows, ref.per_sample)          # rank order = single-process order
        assert rdom.tolist() == ref.per_sample_domain.tolist()
        assert rids.tolist() == ref.extra["per_sample_ids"].tolist()

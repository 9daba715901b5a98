"""MixtureLoader on real and synthetic token stores: tokens, ids, positions, resume, telemetry, eval."""
import json

import numpy as np
import pytest
import torch

from megamix.data.store import TokenStore
from megamix.loader import MixtureLoader, WeightError, eval_batches
from megamix.loader.testing import EOS_ID, build_synthetic_store


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return TokenStore(build_synthetic_store(tmp_path_factory.mktemp("synth"),
                                            {"a": 3000, "b": 9000, "c": 700, "d": 40},
                                            valid_tokens=1000, mean_doc_len=40, seed=1))


def make(store, **kw):
    args = dict(seq_len=32, global_batch_size=16, micro_batch_size=4, weights=[0.4, 0.3, 0.3, 0.0], seed=7)
    args.update(kw)
    return MixtureLoader(store, **args)


def check_batch(store, loader, b):
    """Tokens, labels, ids, positions and segments of every row against the store itself."""
    T = loader.seq_len
    for r in range(len(b)):
        d = int(b.domain_ids[r])
        ds = store.dataset(loader.domains[d], loader.split)
        i = int(b.sample_ids[r]) - int(loader.domain_offsets[d])
        assert 0 <= i < loader.domain_sizes[d]
        win = np.asarray(ds.tokens[i * T:i * T + T + 1], dtype=np.int64)
        assert torch.equal(b.input_ids[r], torch.from_numpy(win[:-1]))
        assert torch.equal(b.labels[r], torch.from_numpy(win[1:]))
        # positions: 0 exactly at document starts, +1 otherwise; segments count documents
        starts = set(ds.doc_offsets.tolist())
        pos, seg = b.position_ids[r].tolist(), b.segment_ids[r].tolist()
        assert pos[0] == 0 and seg[0] == 0 and max(pos) < T
        for k in range(1, T):
            at_start = (i * T + k) in starts
            assert pos[k] == (0 if at_start else pos[k - 1] + 1)
            assert seg[k] == seg[k - 1] + (1 if at_start else 0)


def test_batches_match_the_real_store(tiny_store):
    store = TokenStore(tiny_store)
    loader = MixtureLoader(store, seq_len=64, global_batch_size=8, micro_batch_size=4,
                           weights={d: 1.0 for d in store.domains}, seed=0)
    assert loader.domains == store.domains
    seen_domains = set()
    for _ in range(3):
        mbs = loader.next_step()
        assert len(mbs) == 2
        for b in mbs:
            assert b.input_ids.shape == (4, 64) and b.input_ids.dtype == torch.int64
            check_batch(store, loader, b)
            seen_domains |= set(b.domain_ids.tolist())
    assert seen_domains == set(range(len(store.domains)))
    # EOS really separates documents in the packed stream, and positions reset right after it
    found = 0
    for _ in range(20):
        for b in loader.next_step():
            eos = b.input_ids == store.eos_id
            nxt = torch.zeros_like(eos)
            nxt[:, 1:] = eos[:, :-1]
            assert torch.all(b.position_ids[nxt] == 0) and torch.all(b.segment_ids[nxt] > 0)
            found += int(nxt.sum())
    assert found > 0


def test_synthetic_batches_ids_and_sizes(synth):
    loader = make(synth)
    assert loader.domain_sizes.tolist() == [(3000 - 1) // 32, (9000 - 1) // 32, (700 - 1) // 32, 1]
    for _ in range(5):
        for b in loader.next_step():
            check_batch(synth, loader, b)
            assert 3 not in b.domain_ids.tolist()


def test_weights_by_name_and_errors(synth):
    loader = make(synth, weights={"a": 1, "b": 1, "c": 2, "d": 0})
    assert np.allclose(loader.weights, [0.25, 0.25, 0.5, 0.0])
    with pytest.raises(ValueError, match="unknown \\['zz'\\]"):
        loader.set_weights({"a": 1, "b": 1, "c": 1, "d": 0, "zz": 1})
    with pytest.raises(ValueError, match="missing \\['d'\\]"):
        loader.set_weights({"a": 1, "b": 1, "c": 1})
    with pytest.raises(WeightError, match="negative"):
        loader.set_weights([1, -1, 1, 0])
    with pytest.raises(ValueError, match="micro_batch_size"):
        make(synth, micro_batch_size=3)
    with pytest.raises(ValueError, match="not in the token store"):
        make(synth, domains=["a", "nope"], weights=[1, 1])


def test_domain_too_small_for_a_window_needs_zero_weight(tmp_path):
    store = TokenStore(build_synthetic_store(tmp_path, {"big": 500, "tiny": 20}))
    with pytest.raises(WeightError, match="empty domain.*tiny"):
        MixtureLoader(store, seq_len=32, global_batch_size=4, micro_batch_size=4, weights=[1, 1], seed=0)


def stream(loader, steps, sched=None):
    out = []
    for _ in range(steps):
        if sched and loader.step in sched:
            loader.set_weights(sched[loader.step])
        out.append(torch.cat([torch.stack([b.sample_ids, b.domain_ids]) for b in loader.next_step()], 1))
    return out


def test_loader_resume_exact_with_other_world_and_micro_batch(synth):
    sched = {0: [0.5, 0.2, 0.3, 0.0], 3: [0.1, 0.6, 0.3, 0.0], 9: [0.3, 0.3, 0.4, 0.0], 12: [0.0, 0.5, 0.5, 0.0]}
    ref = stream(make(synth), 16, sched)
    first = make(synth, micro_batch_size=2)
    stream(first, 6, {k: v for k, v in sched.items() if k < 6})
    sd = json.loads(json.dumps(first.state_dict()))
    tel_before = first.telemetry()
    resumed = [make(synth, rank=r, world_size=2, micro_batch_size=8) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(sd)
        assert ld.telemetry()["domains"]["a"]["samples_seen"] == tel_before["domains"]["a"]["samples_seen"]
    for t in range(6, 16):
        got = torch.cat([stream(ld, 1, {t: sched[t]} if t in sched else None)[0] for ld in resumed], 1)
        assert torch.equal(got, ref[t]), t
    with pytest.raises(ValueError, match="seq_len"):
        make(synth, seq_len=16).load_state_dict(sd)
    with pytest.raises(ValueError, match="global_batch_size"):
        make(synth, global_batch_size=32).load_state_dict(sd)


def test_telemetry_tracks_target(synth):
    loader = make(synth, weights=[0.5, 0.25, 0.25, 0.0], telemetry_window=5)
    for _ in range(10):
        loader.next_step()
    loader.set_weights([0.0, 0.5, 0.5, 0.0])
    for _ in range(5):
        loader.next_step()
    tel = loader.telemetry()
    a = tel["domains"]["a"]
    assert tel["step"] == 15 and tel["samples_seen"] == 15 * 16
    assert a["realised_share_window"] == 0.0 and a["target_share_window"] == 0.0  # last 5 steps: weight 0
    assert abs(a["realised_share_cumulative"] - 80 / 240) < 1e-12
    assert abs(a["target_share_cumulative"] - 80 / 240) < 1 / 240
    assert tel["max_abs_share_error_cumulative"] < 1 / 240
    c = tel["domains"]["c"]
    assert c["epoch"] >= 1 and c["epochs_completed"] > 1  # "c" has 21 samples and got ~80
    assert a["tokens_seen"] == a["samples_seen"] * 32


def test_eval_batches_deterministic_and_cover_the_split(synth):
    T = 32
    b1 = list(eval_batches(synth, "b", seq_len=T, batch_size=4))
    b2 = list(eval_batches(synth, "b", seq_len=T, batch_size=4))
    assert len(b1) == len(b2) and all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(b1, b2))
    tokens = np.asarray(synth.dataset("b", "valid").tokens, dtype=np.int64)
    labels = torch.cat([b.labels.reshape(-1) for b in b1])
    labels = labels[labels != -100].numpy()
    assert np.array_equal(labels, tokens[1:])  # every next-token target exactly once, in order
    assert b1[-1].input_ids[-1, -1].item() == EOS_ID  # padded tail
    assert all(torch.all(b.domain_ids == synth.domains.index("b")) for b in b1)
    sharded = [list(eval_batches(synth, "b", seq_len=T, batch_size=4, max_batches=5, rank=r, world_size=2))
               for r in range(2)]
    assert [len(s) for s in sharded] == [3, 2]
    assert torch.equal(sharded[1][0].input_ids, b1[1].input_ids)


def test_layout_with_empty_documents(tmp_path):
    """Positions/segments agree with a per-token reference, also around empty documents."""
    from megamix.data.token_store import IndexedTokenDataset, write_documents
    from megamix.loader import DomainWindows
    rng = np.random.default_rng(0)
    lengths = [0, 5, 0, 0, 1, 17, 0, 3, 40, 2, 0, 9, 1, 1, 30]
    write_documents(tmp_path / "x", [rng.integers(0, 100, size=n) for n in lengths])
    ds = IndexedTokenDataset(tmp_path / "x")
    win = DomainWindows(ds, seq_len=7)
    idx = np.arange(len(win))
    inp, lab, pos, seg = win.gather(idx)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)  # document of every token
    for r, i in enumerate(idx):
        t = np.arange(i * 7, i * 7 + 7)
        assert np.array_equal(inp[r], ds.tokens[t]) and np.array_equal(lab[r], ds.tokens[t + 1])
        assert np.array_equal(pos[r], t - np.maximum(ds.doc_offsets[doc_of[t]], t[0]))
        starts = np.r_[0, (np.diff(doc_of[t]) > 0).astype(int)]
        assert np.array_equal(seg[r], np.cumsum(starts))

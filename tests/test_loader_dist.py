"""Real multi-process runs (torch.multiprocessing spawn, gloo): 4 ranks, then a 2-rank resume
(ranks 0 and 1 in their own process group).

Checks: the ranks' slices are disjoint and together equal the single-process global batch; weights
reach every rank bit for bit through ``broadcast_weights`` (non-zero ranks pass junk); the debug
checksum catches a rank whose weights diverge; a checkpoint written by the 4-rank run and resumed
by 2 ranks continues the exact uninterrupted stream, with weight changes before and after it.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megamix.data.store import TokenStore
from megamix.loader import MixtureLoader, broadcast_weights, verify_consistent
from megamix.loader.testing import build_synthetic_store
from ranks import spawn

STEPS, CKPT_STEP = 14, 6
SCHED = {0: [0.4, 0.3, 0.3, 0.0], 3: [0.1, 0.5, 0.2, 0.2], 8: [0.25, 0.25, 0.25, 0.25], 11: [0.0, 0.6, 0.4, 0.0]}
CFG = dict(seq_len=16, global_batch_size=16, seed=21)


def _loader(store_dir, rank, world, micro):
    return MixtureLoader(TokenStore(store_dir), micro_batch_size=micro, weights=[1, 1, 1, 1],
                         rank=rank, world_size=world, **CFG)


def _run(loader, rank, group, resume_from, out_dir):
    """Train-loop stand-in: rank 0 proposes weights, every step is checked, batches are recorded."""
    rec = {"sample_ids": [], "domain_ids": [], "input_ids": [], "weights": []}
    if resume_from:
        loader.load_state_dict(json.loads(Path(resume_from).read_text()))
    while loader.step < STEPS:
        if loader.step in SCHED:
            proposal = SCHED[loader.step] if rank == 0 else np.random.default_rng(rank).random(4)
            loader.set_weights(broadcast_weights(proposal, group=group, src=0))
        verify_consistent(loader.sampler.checksum(), group=group)  # debug mode: every step
        mbs = loader.next_step()
        rec["sample_ids"].append(torch.cat([b.sample_ids for b in mbs]).numpy())
        rec["domain_ids"].append(torch.cat([b.domain_ids for b in mbs]).numpy())
        rec["input_ids"].append(torch.cat([b.input_ids for b in mbs]).numpy())
        rec["weights"].append(loader.weights)
        if not resume_from and loader.step == CKPT_STEP and rank == 0:
            Path(out_dir, "ckpt.json").write_text(json.dumps(loader.state_dict()))
    return {k: np.stack(v) for k, v in rec.items()}


def _worker(rank, world, init_file, store_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # phase 1: all 4 ranks, checkpoint at CKPT_STEP
        loader = _loader(store_dir, rank, world, micro=2)
        rec = _run(loader, rank, None, "", out_dir)
        detected = 0  # a rank that skips the broadcast must be caught by both checksums
        try:
            loader.set_weights([0.9, 0.1, 0.0, 0.0] if rank == 1 else [0.1, 0.9, 0.0, 0.0], verify=True)
        except RuntimeError as e:
            detected += "mixture weights differs across ranks" in str(e)
        try:
            verify_consistent(loader.sampler.checksum(), group=None)
        except RuntimeError as e:
            detected += "sampler state differs across ranks" in str(e)
        loader.set_weights([0.1, 0.9, 0.0, 0.0], verify=True)  # agreeing weights pass
        np.savez(Path(out_dir, f"w4_rank{rank}.npz"), detected=detected, **rec)
        dist.barrier()
        # phase 2: ranks 0 and 1 resume the checkpoint as a 2-rank job (a process group of 2)
        pair = dist.new_group([0, 1])
        if rank < 2:
            loader = _loader(store_dir, rank, 2, micro=4)
            rec = _run(loader, rank, pair, str(Path(out_dir, "ckpt.json")), out_dir)
            np.savez(Path(out_dir, f"w2_rank{rank}.npz"), **rec)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return build_synthetic_store(tmp_path_factory.mktemp("dist_store"),
                                 {"a": 2000, "b": 6000, "c": 900, "d": 400}, mean_doc_len=30, seed=3)


def _reference(store_dir):
    loader = _loader(store_dir, 0, 1, micro=16)
    out = []
    while loader.step < STEPS:
        if loader.step in SCHED:
            loader.set_weights(SCHED[loader.step])
        b = loader.next_step()[0]
        out.append((b.sample_ids.numpy(), b.domain_ids.numpy(), b.input_ids.numpy()))
    return out, loader


def test_four_ranks_then_resume_on_two(store_dir, tmp_path):
    """One spawn of 4 processes covers both world sizes (one spawn instead of two)."""
    ref, ref_loader = _reference(store_dir)
    spawn(_worker, (4, str(tmp_path / "init"), str(store_dir), str(tmp_path)), 4)
    four = [np.load(tmp_path / f"w4_rank{r}.npz") for r in range(4)]
    two = [np.load(tmp_path / f"w2_rank{r}.npz") for r in range(2)]
    assert all(int(r["detected"]) == 2 for r in four), "diverged weights were not detected"
    for t in range(STEPS):
        sids = np.concatenate([r["sample_ids"][t] for r in four])
        assert np.array_equal(sids, ref[t][0]), t                                # union == global batch
        assert len(np.unique(sids)) == len(sids), t                              # disjoint ranks
        assert np.array_equal(np.concatenate([r["domain_ids"][t] for r in four]), ref[t][1])
        assert np.array_equal(np.concatenate([r["input_ids"][t] for r in four]), ref[t][2])
        assert all(np.array_equal(r["weights"][t], four[0]["weights"][t]) for r in four)  # bit-identical
    assert np.allclose(four[0]["weights"][3], SCHED[3])  # rank 0's proposal won

    # no sample of a domain repeats within its first epoch (steps whose running count stays <= size)
    for d, n in enumerate(ref_loader.domain_sizes):
        ids = [np.concatenate([r["sample_ids"][t] for r in four])[ref[t][1] == d] for t in range(STEPS)]
        upto = np.flatnonzero(np.cumsum([len(x) for x in ids]) <= n)
        if len(upto):
            first = np.concatenate(ids[:upto[-1] + 1])
            assert len(np.unique(first)) == len(first) > 0, d

    for k, t in enumerate(range(CKPT_STEP, STEPS)):
        sids = np.concatenate([r["sample_ids"][k] for r in two])
        assert np.array_equal(sids, ref[t][0]), t
        assert np.array_equal(np.concatenate([r["input_ids"][k] for r in two]), ref[t][2])

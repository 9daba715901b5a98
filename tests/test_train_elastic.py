"""Resuming a DeepSpeed run on a different number of ranks (megamix.train.elastic, DeepSpeed's universal
checkpoints through megamix.integrations.ds_universal): real gloo runs on CPU.

Each case: a run S on the old world size stops (and checkpoints) at step 3, mid-round (mixing.update_every=2);
a run R resumes a copy of it on the new world size. Checked against S's state gathered just before the save and
against uninterrupted runs on both world sizes (O: old, the saving run continued; N: new):
- the gathered fp32 parameters and Adam's exp_avg / exp_avg_sq after the load equal S's before the save, bit for
  bit, as do Adam's step and every param group's hyper-parameters;
- R's step losses equal O's and N's at the same steps (LOSS_RTOL; measured in fp32: equal to the last bit);
- R's global batches (domain and sample ids of every rank, in rank order) equal N's and O's, exactly;
- the weight history up to the checkpoint is O's; the weights set after it (the round the old ranks' statistics
  were merged into) equal N's and O's (measured: O's bit for bit, N's within 1e-8); DoGraph's clusters (from its
  reservoir, merged by key) and reservoir equal N's.
Plus the merge itself on its own (megamix.stats.DomainStats.merge_states, megamix.train.elastic) and the one-line
refusal of a changed global batch size.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from test_integration_deepspeed import _cfg, _free_port  # noqa: E402

from megamix.configbase import ConfigError  # noqa: E402
from megamix.stats import DomainStats, sample_keys  # noqa: E402
from ranks import spawn

#: train.steps of every run, and the step the interrupted run stops (and checkpoints) at: mid-round (update_every=2)
STEPS, STOP = 5, 3
#: DoGraph with a reservoir smaller than a step's 8 samples, so merging the old ranks' rows must drop some by key
DOGRAPH = ("mixing.strategy=dograph", "mixing.dograph_reservoir=6")
#: relative tolerance on step losses between runs that differ only in how the global batch is split over ranks
#: (float reduction order of the gradient all-reduce and of the loss average)
LOSS_RTOL = 2e-5


# ------------------------------------------------------------------------------------- the runs
def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)


def _engine_state(backend) -> dict:
    """The engine's full training state, gathered (collective under ZeRO-3): fp32 parameters, Adam's moments,
    its step, and each param group's hyper-parameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = backend.engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):
        # ZeRO-1/2 in DeepSpeed 0.19.8 link each parameter to its optimizer-state fragment once, right after the
        # first param group's first step, before the other groups have any state: the no-decay group's fragments
        # stay empty and safe_get_full_optimizer_state fails for them. Link them again (views, nothing changes).
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            if zero.optimizer.state[flat]:
                lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, zero.optimizer.state)
    opt = getattr(zero, "optimizer", zero)   # the torch optimizer (ZeRO-0 in fp32: the engine's own)
    out = {}
    for name, p in backend.model.named_parameters():
        if opt is zero:   # ZeRO-0: full parameters and state on every rank
            out[name] = {"fp32": p.detach().clone(), **{k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}}
            continue
        out[name] = {"fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
                     "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                     "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone()}
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"params": out, "steps": sorted({float(s) for s in steps}), "groups": groups,
            "own_steps": len({id(s) for s in steps}) == len(steps)}   # one step counter per Adam state


def _worker(rank: int, world: int, port: int, data_dir: str, root: str, jobs: list) -> None:
    """Run each job ``(name, zero, extra overrides, stop_at_step)`` on ``world`` ranks; per job and rank, save the
    engine state at the stop step (before the save) and right after a resume, the global batch ids of every
    step, the losses, weights and weight history."""
    _setup(rank, world, port)
    from megamix.train.callbacks import Callback, default_callbacks
    from megamix.train.loop import Trainer

    class Probe(Callback):
        def __init__(self, at):
            self.at, self.state = at, None

        def on_step_end(self, trainer, out):
            if out.step == self.at:
                self.state = _engine_state(trainer.backend)

    for name, zero, extra, stop in jobs:
        probe = Probe(stop)
        t0 = time.time()
        t = Trainer(_cfg(data_dir, f"{root}/{name}", zero, *extra), rank=rank, world_size=world, progress=False,
                    log_to_stdout=False, stop_at_step=stop, callbacks=default_callbacks() + [probe])
        loaded = _engine_state(t.backend) if t.start else None
        ids, draw = [], t.mixer.next_step

        def recorded(draw=draw, ids=ids):
            batches = draw()
            ids.append([(int(d), int(s)) for b in batches for d, s in zip(b.domain_ids, b.sample_ids)])
            return batches

        t.mixer.next_step = recorded
        r = t.fit()
        torch.save({"start": r.start_step, "losses": r.step_losses, "weights": r.weights, "history": r.weight_history,
                    "ids": ids, "saved": probe.state, "loaded": loaded, "seconds": time.time() - t0},
                   Path(root, f"{name}_rank{rank}.pt"))


def _spawn(world: int, root: Path, data_dir: Path, jobs: list) -> dict:
    spawn(_worker, (world, _free_port(), str(data_dir), str(root), jobs), world)
    return {name: [torch.load(root / f"{name}_rank{r}.pt", weights_only=False) for r in range(world)]
            for name, *_ in jobs}


def _global_ids(ranks: list[dict]) -> list[list]:
    """Every step's global batch: the ranks' slices in rank order."""
    return [sum((r["ids"][i] for r in ranks), []) for i in range(len(ranks[0]["ids"]))]


def _convert_by_hand(ckpt: Path) -> dict:
    """What a user does (docs/training.md): DeepSpeed's converter, from the command line, into <checkpoint>/universal.
    Returns the modification times of what it wrote (a resume must use the folder, not convert again)."""
    out = ckpt / "universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
                    "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
                    "--num_merge_workers", "1"], check=True, capture_output=True, env={**os.environ,
                                                                                       "DS_ACCELERATOR": "cpu"})
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}


def _run_case(tmp_path: Path, tiny_store: Path, zero: int, old: int, new: int, extra: tuple = (),
              by_hand: bool = False) -> dict:
    """O (uninterrupted, old world), S (old world, stops at step 3), N (uninterrupted, new world), R (a copy of S
    resumed on the new world; ``by_hand``: with a universal checkpoint converted beforehand). Two spawns."""
    data = tiny_store.parent
    extra = (f"train.steps={STEPS}",) + tuple(extra)
    res = _spawn(old, tmp_path, data, [("O", zero, extra, None), ("S", zero, extra, STOP)])
    shutil.copytree(tmp_path / "S", tmp_path / "R")
    ckpt = tmp_path / "R" / "checkpoints" / f"step_{STOP:07d}"
    made = _convert_by_hand(ckpt) if by_hand else None
    res |= _spawn(new, tmp_path, data, [("N", zero, extra, None), ("R", zero, extra, None)])
    if made is not None:   # used as it was: not converted again
        assert {str(p): p.stat().st_mtime_ns for p in (ckpt / "universal").rglob("*")} == made
    # ZeRO 1-3 partition the optimizer states: a universal checkpoint; ZeRO-0 (fp32) loads its files as they are
    assert (ckpt / "universal" / "zero" / "optimizer_state.pt").is_file() == (zero > 0)
    assert not (ckpt / ".universal.tmp").exists()
    return res


# ------------------------------------------------------------------------------------- the checks
def _max_diff(a: dict, b: dict) -> dict:
    """Max abs difference per state kind over every parameter (asserts the same parameter names)."""
    assert a["params"].keys() == b["params"].keys()
    return {k: max(float((a["params"][n][k] - b["params"][n][k]).abs().max()) for n in a["params"])
            for k in ("fp32", "exp_avg", "exp_avg_sq")}


def _check_state(res: dict, new: int, report: dict) -> None:
    """The engine state after the load equals the one gathered before the save, bit for bit, on every new rank."""
    saved = res["S"][0]["saved"]
    assert saved is not None and saved["steps"] == [float(STOP)], saved and saved["steps"]
    for r in range(new):
        loaded = res["R"][r]["loaded"]
        assert res["R"][r]["start"] == STOP and loaded is not None
        diff = _max_diff(saved, loaded)
        report[f"params/moments max|loaded - saved| (rank {r})"] = diff
        assert diff == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, diff
        # Adam's step, one counter per state, and each group's hyper-parameters (its own weight decay): DeepSpeed
        # 0.19.8's ZeRO-3 universal loader shares one step and copies group 0's (megamix repairs both)
        assert loaded["steps"] == saved["steps"] and loaded["own_steps"]
        assert loaded["groups"] == saved["groups"]
        assert any(float(p["exp_avg"].abs().max()) > 0 for p in loaded["params"].values())


def _check_training(res: dict, report: dict, rtol: float = LOSS_RTOL, hist_atol: float = 1e-6) -> None:
    """Losses after the resume vs the saving run continued (O) and an uninterrupted new-world run (N); the
    loader stream; the weights and their history."""
    S, R, O, N = (res[n] for n in "SRON")
    assert S[0]["losses"] == O[0]["losses"][:STOP]          # S is O's prefix (same world size: bit for bit)
    after = np.array(R[0]["losses"])
    assert len(after) == STEPS - STOP and np.all(np.isfinite(after))
    for ref, name in ((O, "the saving run continued (old world)"), (N, "uninterrupted new world")):
        rel = np.abs(after - np.array(ref[0]["losses"][STOP:])) / np.abs(after)
        report[f"loss max rel diff vs {name}"] = float(rel.max())
        np.testing.assert_allclose(after, ref[0]["losses"][STOP:], rtol=rtol)
    # the loader stream: R's global batches are N's (and O's), id for id
    assert _global_ids(R) == _global_ids(N)[STOP:] == _global_ids(O)[STOP:]
    # mixing: the history up to the checkpoint is S's (= O's); after it, the weights equal N's and O's (the round in
    # progress was merged onto rank 0) to float reduction order (bf16: the two world sizes' statistics differ more)
    assert all(R[r]["history"] == R[0]["history"] for r in range(len(R)))
    hist_r = R[0]["history"]
    assert [w for w in hist_r if w[0] <= STOP] == [w for w in O[0]["history"] if w[0] <= STOP]
    for ref, name in ((N, "uninterrupted new world"), (O, "the saving run continued")):
        hist = ref[0]["history"]
        assert [s for s, _ in hist_r] == [s for s, _ in hist]
        later = [(wr, w) for (s, wr), (_, w) in zip(hist_r, hist) if s > STOP]
        report[f"weights after the resume max|diff| vs {name}"] = max(
            (float(np.abs(np.subtract(wr, w)).max()) for wr, w in later), default=0.0)
        for wr, w in later:
            np.testing.assert_allclose(wr, w, atol=hist_atol)


def _side(run: Path, rank: int = 0) -> dict:
    return torch.load(run / "checkpoints" / f"step_{STEPS:07d}" / f"megamix_rank{rank:05d}.pt", map_location="cpu",
                      weights_only=False)


def _report(report: dict, t0: float, what: str) -> None:
    print(f"\n{what}: {time.time() - t0:.1f}s")
    for k, v in report.items():
        print(f"  {k}: {v}")


CASES = [pytest.param(1, 2, 1, id="zero1-2to1-dograph"), pytest.param(1, 1, 2, id="zero1-1to2-converted-by-hand"),
         pytest.param(3, 2, 1, id="zero3-2to1"), pytest.param(3, 1, 2, id="zero3-1to2")]


@pytest.mark.parametrize("zero,old,new", CASES)
def test_deepspeed_resume_on_another_world_size(tmp_path, tiny_store, zero, old, new):
    """R&B, except ZeRO-1 2 -> 1: DoGraph, whose reservoir (6 rows, 8 samples per step) is merged by key."""
    t0 = time.time()
    dograph = (zero, old, new) == (1, 2, 1)
    res = _run_case(tmp_path, tiny_store, zero, old, new, DOGRAPH if dograph else (), by_hand=(zero, old) == (1, 1))
    report: dict = {}
    _check_state(res, new, report)
    _check_training(res, report)
    assert len(res["N"][0]["history"]) == (1 if dograph else 3)   # R&B: new weights at steps 2 and 4
    if dograph:   # the clusters of the round completed after the resume, and the reservoir of the one in progress
        r, n = _side(tmp_path / "R")["mixer"], _side(tmp_path / "N")["mixer"]
        cr, cn = r["strategy"]["clusters"], n["strategy"]["clusters"]
        for key in ("centroids", "cluster_weights", "cluster_shares"):
            report[f"DoGraph {key} max|diff| vs uninterrupted new world"] = float(
                np.abs(np.subtract(cr[key], cn[key])).max())
            np.testing.assert_allclose(cr[key], cn[key], rtol=1e-4, atol=1e-5)
        assert len(cr["cluster_weights"]) >= 2
        assert torch.equal(r["stats"]["row_keys"], n["stats"]["row_keys"]) and len(r["stats"]["row_keys"]) == 6
        torch.testing.assert_close(r["stats"]["rows"], n["stats"]["rows"], rtol=1e-4, atol=1e-6)
    _report(report, t0, f"ZeRO-{zero}, {old} -> {new} ranks{' (DoGraph)' if dograph else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("zero,old,new,extra", [pytest.param(2, 2, 4, (), id="zero2-2to4"),
                                                pytest.param(0, 2, 1, (), id="zero0-2to1"),
                                                pytest.param(3, 2, 1, ("train.dtype=bf16",), id="zero3-bf16-2to1")])
def test_deepspeed_resume_on_another_world_size_slow(tmp_path, tiny_store, zero, old, new, extra):
    """ZeRO-2 onto 4 ranks (one micro-step each instead of two); ZeRO-0, which needs no conversion; bf16 ZeRO-3
    (bf16 parameters, fp32 master weights: the master weights and moments are what must come back)."""
    t0 = time.time()
    res = _run_case(tmp_path, tiny_store, zero, old, new, extra)
    report: dict = {}
    _check_state(res, new, report)
    # bf16: the two world sizes' runs differ in bf16 rounding (measured: losses 1.5e-5 relative, weights 4e-5 apart
    # between N and O); R follows O, the run it continues (measured: 3e-6 and 0)
    _check_training(res, report, **({"rtol": 1e-4, "hist_atol": 1e-4} if extra else {}))
    _report(report, t0, f"ZeRO-{zero}{' bf16' if extra else ''}, {old} -> {new} ranks")


# ------------------------------------------------------------------------------------- the merge on its own
D, K, ROWS = 3, 5, 11


def _feed(st: DomainStats, steps: range, part: slice) -> None:
    """Steps of 8 samples (the same ones for every caller); this rank feeds the ``part`` of each."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        rows, dom = torch.randn(8, K, generator=g), torch.randint(0, D, (8,), generator=g)
        ids, ls = torch.randperm(1000, generator=g)[:8], torch.rand(8, generator=g) * 20
        tc = torch.randint(1, 9, (8,), generator=g).double()
        j = torch.arange(8)[part]
        st.update(rows[j], dom[j], sample_ids=ids[j], token_loss_sum=ls[j], token_count=tc[j],
                  keys=sample_keys(7, step, ids[j]))


def _assert_same_round(a: dict, b: dict, ordered: bool = True) -> None:
    """Equal round accumulators; the per-sample rows equal in order, or as sets (sorted by key)."""
    for f in ("sums", "loss_sum"):
        torch.testing.assert_close(a[f], b[f], rtol=1e-12, atol=1e-12)
    assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["token_count"], b["token_count"])
    oa = torch.arange(len(a["row_keys"])) if ordered else torch.argsort(a["row_keys"])
    ob = torch.arange(len(b["row_keys"])) if ordered else torch.argsort(b["row_keys"])
    for f in ("rows", "row_domains", "row_ids", "row_keys", "row_loss"):
        assert torch.equal(a[f][oa], b[f][ob]), f


@pytest.mark.parametrize("max_rows", [ROWS, None])
def test_merge_states_gives_new_rank0_the_round_of_every_old_rank(max_rows):
    """Two old ranks, mid-round (3 steps, each rank its half of every step): merged, the new rank 0 holds what one
    process that saw every sample holds (the reservoir: the same rows, as all_reduce keeps them), the other new ranks an
    empty round; and after one more step on the new ranks, the round's reduction equals the one process's."""
    single = DomainStats(D, K, max_rows=max_rows)
    _feed(single, range(1, 4), slice(None))
    old = [DomainStats(D, K, max_rows=max_rows) for _ in range(2)]
    for r, st in enumerate(old):
        _feed(st, range(1, 4), slice(4 * r, 4 * r + 4))
    states = [st.state_dict() for st in old]
    merged = DomainStats.merge_states(states, rank=0)
    _assert_same_round(merged, single.state_dict(), ordered=False)   # the same rows (the order: rank-major)
    assert merged["counter"] == 24
    empty = DomainStats.merge_states(states[:1], rank=1)
    assert empty["counter"] == 0 and len(empty["rows"]) == 0 and not empty["sums"].any() and not empty["counts"].any()
    # the round goes on on 3 new ranks (8 samples split 3/3/2), then ends: its reduction is the one process's
    new = [DomainStats(D, K, max_rows=max_rows) for _ in range(3)]
    for r, st in enumerate(new):
        st.load_state_dict(DomainStats.merge_states(states if r == 0 else states[:1], rank=r))
        _feed(st, range(4, 5), slice(3 * r, 3 * r + 3))
    _feed(single, range(4, 5), slice(None))
    reduced = DomainStats.merge_states([st.state_dict() for st in new], rank=0)   # all_reduce's rule, offline
    _assert_same_round(reduced, single.state_dict(), ordered=False)
    with pytest.raises(ValueError, match="max_rows"):
        DomainStats.merge_states([states[0], DomainStats(D, K, max_rows=4).state_dict()])


def _side_state(rank: int, world: int, stats: dict, step: int = 3, loader: dict | None = None) -> dict:
    return {"format": 2, "step": step, "world_size": world, "backend": "deepspeed",
            "config": {"train": {"global_batch_size": 8}}, "torch_rng": torch.tensor([rank]), "cuda_rng": None,
            "mixer": {"loader": loader or {"sampler": {"global_batch_size": 8, "step": step}},
                      "strategy": {"owner": rank}, "stats": stats, "domains": ["a", "b", "c"], "projection_seed": 0}}


def test_merge_side_states_contract():
    from megamix.train.elastic import check_global_batch, merge_side_states, sides_needed

    assert sides_needed(0, 2) == [0, 1] and sides_needed(1, 2) == [0, 1] and sides_needed(1, 4) == [0, 1]
    assert sides_needed(3, 2) == [0] and sides_needed(0, 1) == [0]
    stats = []
    for r in range(2):
        st = DomainStats(D, K, max_rows=ROWS)
        _feed(st, range(1, 3), slice(4 * r, 4 * r + 4))
        stats.append(st.state_dict())
    sides = {r: _side_state(r, 2, stats[r]) for r in range(2)}
    to1 = merge_side_states(sides, 0, 1)   # 2 -> 1
    assert to1["world_size"] == 1 and to1["resized_from"] == 2 and to1["step"] == 3
    assert to1["mixer"]["strategy"] == {"owner": 0} and to1["mixer"]["loader"] == sides[0]["mixer"]["loader"]
    assert torch.equal(to1["torch_rng"], torch.tensor([0]))
    _assert_same_round(to1["mixer"]["stats"], DomainStats.merge_states(stats, rank=0))
    for r, rng in ((1, 1), (2, 0), (3, 0)):   # 2 -> 4: old rank r's random state where there was one, else 0's
        side = merge_side_states({k: sides[k] for k in sides_needed(r, 2)}, r, 4)
        assert torch.equal(side["torch_rng"], torch.tensor([rng])) and side["mixer"]["strategy"] == {"owner": 0}
        assert len(side["mixer"]["stats"]["rows"]) == 0 and not side["mixer"]["stats"]["counts"].any()
    with pytest.raises(ValueError, match="needs old rank"):
        merge_side_states({0: sides[0]}, 0, 1)
    bad = {0: sides[0], 1: _side_state(1, 2, stats[1], loader={"sampler": {"global_batch_size": 8, "step": 2}})}
    with pytest.raises(ValueError, match="loader states"):
        merge_side_states(bad, 0, 1)
    with pytest.raises(ValueError, match="different saves"):
        merge_side_states({0: sides[0], 1: _side_state(1, 2, stats[1], step=4)}, 0, 1)
    check_global_batch(to1, 8, "ck")
    with pytest.raises(ConfigError, match=r"^train.global_batch_size=16 but checkpoint ck was written with "
                                          r"train.global_batch_size=8: .* set train.global_batch_size=8 [^\n]*$"):
        check_global_batch(to1, 16, "ck")


def test_resume_on_another_world_size_refuses_a_changed_global_batch_before_loading(tmp_path, tiny_store):
    """Through Checkpoints.load, with a backend that can change the world size: one line naming the field and the
    saved value, before the backend loads (converts) anything."""
    from megamix.train.backend import PlainBackend
    from megamix.train.checkpoint import Checkpoints
    from megamix.train.loop import train

    data = str(tiny_store.parent)
    plain = ("deepspeed.enabled=false", "train.steps=2")
    train(_cfg(data, str(tmp_path / "r"), 1, *plain), progress=False, log_to_stdout=False)

    class Resizable(PlainBackend):
        def resize_note(self, root, tag):
            return "test"

        def load(self, *a, **k):
            raise AssertionError("loaded before refusing")

    cfg = _cfg(data, str(tmp_path / "r"), 1, *plain, "train.global_batch_size=16")
    with pytest.raises(ConfigError, match="train.global_batch_size=16 but .* train.global_batch_size=8") as e:
        Checkpoints(tmp_path / "r").load(Resizable(rank=0, world_size=2), mixer=None, cfg=cfg)
    assert "\n" not in str(e.value)

    class Fixed(PlainBackend):   # a backend without resize_note cannot resume on another world size
        resize_note = None

    with pytest.raises(ConfigError, match="cannot change it; resume with the same world size"):
        Checkpoints(tmp_path / "r").load(Fixed(rank=0, world_size=2), mixer=None, cfg=cfg)

"""The non-finite guard (megamix.train.guard, train.on_nonfinite): a NaN/Inf step is never trained on or saved.

A NaN is injected by a forward hook on the input embedding at one chosen step (a backend subclass arms it),
so the loss and every gradient of that step are NaN, as after an overflow. Checked: ``skip`` leaves the
parameters and the optimizer state exactly as they were and keeps the step's statistics from the strategy;
``stop`` raises before the update and leaves the last checkpoint as ``latest``; no checkpoint is written from
non-finite parameters; the CLI exits 2 with one line; under DeepSpeed (2 gloo ranks, ZeRO-1 and ZeRO-3) a NaN
on one rank only makes every rank skip the same step.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megamix.config import MegamixConfig
from megamix.train.backend import DeepSpeedBackend, PlainBackend
from megamix.train.guard import NonFiniteError
from ranks import free_port as _free_port, spawn


def _cfg(data_dir: Path, out_dir: Path, *extra: str) -> MegamixConfig:
    ov = [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", "model.n_layer=1", "model.n_embd=32",
          "model.n_head=2", "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
          "train.warmup_steps=2", "train.eval_batches=1", "train.eval_every=0", "train.log_every=1",
          "train.threads=1", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=3",
          *extra]
    return MegamixConfig.from_yaml(None, ov).validate()


def _poisoned(base):
    """``base`` backend class whose forwards produce NaN during the steps in ``bad`` (0-based) on ``ranks``;
    it records the local parameters around each optimizer step and the learning rate in force."""

    class Poisoned(base):
        bad: set = set()
        ranks: set = {0}
        armed = False

        def setup(self, model, optimizer, lr_at, cfg):
            super().setup(model, optimizer, lr_at, cfg)
            self.record = []
            self.optimizer_ = optimizer
            self.model.get_input_embeddings().register_forward_hook(
                lambda mod, inp, out: out * float("nan") if self.armed else None)

        def before_step(self, step):
            super().before_step(step)
            self.step_now = step
            self.armed = step in self.bad and self.rank in self.ranks
            self.lr_now = self.optimizer_.param_groups[0]["lr"]

        def optimizer_step(self, skip=False):
            before = [p.clone() for p in self.local_parameters()]
            gn = super().optimizer_step(skip)
            after = self.local_parameters()
            self.armed = False
            self.record.append({"step": self.step_now, "skip": bool(skip),
                                "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                                "finite": all(bool(torch.isfinite(a).all()) for a in after),
                                "lr": self.lr_now})
            return gn

    return Poisoned


def test_skip_drops_the_step_and_its_statistics(tiny_store, tmp_path):
    from megamix.train.loop import lr_at, train

    cfg = _cfg(tiny_store.parent, tmp_path / "skip", "train.steps=6", "train.on_nonfinite=skip")
    backend = _poisoned(PlainBackend)()
    backend.bad = {2}
    res = train(cfg, backend=backend, progress=False, log_to_stdout=False)
    assert [r["skip"] for r in backend.record] == [False, False, True, False, False, False]
    assert [r["unchanged"] for r in backend.record] == [False, False, True, False, False, False]
    assert all(r["finite"] for r in backend.record)
    # the learning rate keeps following the step index across the skipped step
    assert [r["lr"] for r in backend.record] == [lr_at(s, cfg) for s in range(6)]
    # AdamW took 5 steps, not 6: the skipped one changed no optimizer state
    opt_state = torch.load(tmp_path / "skip" / "checkpoints" / "step_0000006" / "model.pt", weights_only=False)
    assert {int(s["step"]) for s in opt_state["optimizer"]["state"].values()} == {5}
    assert math.isnan(res.step_losses[2]) and all(math.isfinite(x) for i, x in enumerate(res.step_losses) if i != 2)
    recs = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in recs if r["kind"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["action"] == "skip" and bad[0]["loss"] == "nan"
    # step 3 (skipped) closes a mixing round on schedule: the strategy updates at steps 3 and 6 as without the NaN,
    # the first round from the statistics of its 2 good steps only (the skipped step's never reach it), all finite
    mixing = [r for r in recs if r["kind"] == "mixing"]
    assert [r["step"] for r in mixing] == [3, 6]
    assert [sum(r["counts"].values()) for r in mixing] == [2 * 8, 3 * 8]
    assert all(v is None or math.isfinite(v) for r in mixing for v in r["domain_train_loss"].values())
    assert [s for s, _ in res.weight_history][1:] == [3, 6]   # the weights changed at both round boundaries
    assert all(math.isfinite(w) for w in res.weights.values())


def test_stop_raises_before_the_update_and_keeps_latest(tiny_store, tmp_path):
    from megamix.train.loop import train

    cfg = _cfg(tiny_store.parent, tmp_path / "stop", "train.steps=6", "train.checkpoint_every=2")
    assert cfg.train.on_nonfinite == "stop"  # the default
    backend = _poisoned(PlainBackend)()
    backend.bad = {2}
    with pytest.raises(NonFiniteError, match=r"step 3: the training loss is nan; stopped before the optimizer step.*"
                                             r"restarts from .*step_0000002.*train.on_nonfinite=skip"):
        train(cfg, backend=backend, progress=False, log_to_stdout=False)
    ck = tmp_path / "stop" / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000002"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_0000002"]
    recs = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["action"]) for r in recs if r["kind"] == "nonfinite"] == [(3, "stop")]


def test_no_checkpoint_of_non_finite_parameters(tiny_store, tmp_path):
    from megamix.train.checkpoint import Checkpoints
    from megamix.train.loop import train

    cfg = _cfg(tiny_store.parent, tmp_path / "r", "train.steps=2")
    train(cfg, progress=False, log_to_stdout=False)
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    from megamix.train.loop import build_optimizer, lr_at
    from megamix.train.model import build_model

    model = build_model(cfg.model, seed=0)
    backend = PlainBackend()
    backend.setup(model, build_optimizer(model, cfg), lambda s: lr_at(s, cfg), cfg)
    mixer = Mixer(cfg, TokenStore(tiny_store))
    ckpt = Checkpoints(tmp_path / "r")
    assert ckpt.load(backend, mixer, cfg) == 2
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 3: the model parameters are not finite; checkpoint .*step_0000003 "
                                             r"was not written \(the last one is .*step_0000002\)"):
        ckpt.save(3, backend, mixer, cfg)
    assert not (tmp_path / "r" / "checkpoints" / "step_0000003").exists()
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_0000002"


def test_cli_stops_with_exit_code_2_and_one_line(tiny_store, tmp_path, capsys):
    from megamix.cli import main

    y = tmp_path / "run.yaml"
    y.write_text(_cfg(tiny_store.parent, tmp_path / "cli", "train.steps=4", "train.lr=1e30", "train.warmup_steps=0",
                      "train.grad_clip=0").to_yaml())
    assert main(["train", "--config", str(y), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the training loss is" in err[0] and "stopped before the optimizer step" in err[0], err
    assert "train.on_nonfinite=skip" in err[0]


# ------------------------------------------------------------------------------------------- DeepSpeed
def _ds_worker(rank: int, port: int, data_dir: str, root: str, zeros: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    from megamix.train.loop import lr_at, train

    out = {}
    for zero in zeros:
        cfg = _cfg(Path(data_dir), Path(root) / f"z{zero}", "train.steps=4", "train.on_nonfinite=skip",
                   "train.micro_batch_size=2", "deepspeed.enabled=true", f"deepspeed.zero_stage={zero}",
                   "mixing.update_every=2")
        backend = _poisoned(DeepSpeedBackend)(rank, 2)
        backend.bad, backend.ranks = {1}, {1}      # NaN on rank 1 only, at the second step
        res = train(cfg, backend=backend, progress=False, log_to_stdout=False)
        out[zero] = {"record": backend.record, "losses": res.step_losses, "weights": res.weights,
                     "lr_expected": [lr_at(s, cfg) for s in range(4)]}
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))


def test_deepspeed_ranks_agree_to_skip(tiny_store, tmp_path):
    pytest.importorskip("deepspeed")
    zeros = [1, 3]
    spawn(_ds_worker, (_free_port(), str(tiny_store.parent), str(tmp_path), zeros), 2)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for z in map(str, zeros):
        for i in range(2):
            rec = r[i][z]["record"]
            assert [x["skip"] for x in rec] == [False, True, False, False], (z, i)   # rank 0 had no NaN, skips too
            assert [x["unchanged"] for x in rec] == [False, True, False, False], (z, i)
            assert all(x["finite"] for x in rec)
            assert [x["lr"] for x in rec] == pytest.approx(r[i][z]["lr_expected"], rel=1e-12)
        assert r[0][z]["weights"] == r[1][z]["weights"]
        losses = r[0][z]["losses"]
        assert math.isnan(losses[1]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
        assert (tmp_path / f"z{z}" / "checkpoints" / "latest").read_text() == "step_0000004"

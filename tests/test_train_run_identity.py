"""One run per ``train.out_dir`` and checkpoints that prove their own content (megamix.train.checkpoint, .markers).

A new run refuses a folder holding an earlier run's checkpoints unless ``--overwrite`` deletes them; every run has
a run id (``run.json``, recorded in each checkpoint) and a resume never falls back into another run's checkpoint;
a file garbled in place at its old size (plain ``model.pt``, a DeepSpeed engine file) fails its checksum and the
resume falls back to the previous complete checkpoint, naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from megamix.config import MegamixConfig
from ranks import free_port as _free_port, spawn

BASE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_batches=1", "train.eval_every=0",
        "train.threads=1", "train.log_every=1", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
        "mixing.update_every=2"]


def _cfg(data_dir: Path, out_dir: Path, *extra: str) -> MegamixConfig:
    return MegamixConfig.from_yaml(None, [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", *BASE,
                                          *extra]).validate()


def _train(data_dir: Path, out: Path, *extra: str, **kw):
    from megamix.train.loop import train

    return train(_cfg(data_dir, out, *extra), progress=False, log_to_stdout=False, **kw)


def _markers(d: Path) -> list[dict]:
    return [json.loads(m.read_text()) for m in sorted(d.glob("megamix_rank*.done.json"))]


def _edit_markers(d: Path, fn) -> None:
    for m in d.glob("megamix_rank*.done.json"):
        doc = json.loads(m.read_text())
        fn(doc)
        m.write_text(json.dumps(doc))


def _garble(path: Path, at: float = 0.5) -> None:
    """Flip 64 bytes inside ``path`` (its size unchanged: only reading it can tell)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + 64] = bytes(b ^ 0xFF for b in data[i:i + 64])
    path.write_bytes(bytes(data))


def _train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.fixture(scope="module")
def old_run(tiny_store, tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4 (the reference for resumes too)."""
    out = tmp_path_factory.mktemp("old_run") / "run"
    res = _train(tiny_store.parent, out, "train.steps=4", "train.checkpoint_every=2")
    return res, out


def _copy(old: Path, dst: Path) -> Path:
    shutil.copytree(old, dst)
    return dst


def _resume(tiny_store, out: Path):
    return _train(tiny_store.parent, out, "train.steps=4", "train.checkpoint_every=2")


def _resume_warning(caplog) -> str:
    warn = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warn) == 1, [r.getMessage() for r in caplog.records]
    return warn[0]


# ------------------------------------------------------------------ one run per out_dir
def test_new_run_refuses_a_folder_with_another_runs_checkpoints(tiny_store, tmp_path, old_run, capsys):
    from megamix.cli import main

    out = _copy(old_run[1], tmp_path / "run")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    run_json = (out / "run.json").read_text()
    y = tmp_path / "c.yaml"
    y.write_text(_cfg(tiny_store.parent, out, "train.steps=2", "train.resume=false",
                      "model.vocab_size=50257").to_yaml())   # (an automatic vocab size adds a note line)
    capsys.readouterr()
    assert main(["train", "--config", str(y), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"train.out_dir={out}" in err[0] and "step_0000004" in err[0]
    assert "--overwrite" in err[0] and "set a new train.out_dir" in err[0]
    # the dry run refuses alike; nothing was touched
    assert main(["train", "--config", str(y), "--dry-run"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "run.json").read_text() == run_json


def test_overwrite_deletes_the_earlier_run_and_starts_at_step_0(tiny_store, tmp_path, old_run, capsys):
    from megamix.cli import main

    out = _copy(old_run[1], tmp_path / "run")
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    assert {m["run_id"] for m in _markers(out / "checkpoints" / "step_0000004")} == {old_id}
    y = tmp_path / "c.yaml"
    y.write_text(_cfg(tiny_store.parent, out, "train.steps=2", "train.resume=false").to_yaml())
    assert main(["train", "--config", str(y), "--dry-run", "--overwrite"]) == 0
    assert "will delete the 2 checkpoint(s)" in capsys.readouterr().out
    assert (out / "checkpoints" / "step_0000004").is_dir()             # the dry run deletes nothing
    assert main(["train", "--config", str(y), "--no-progress", "--overwrite"]) == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_0000002"]   # step 4 (old) is gone
    assert not list(out.glob(".deleting_*"))
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != old_id and {m["run_id"] for m in _markers(ck / "step_0000002")} == {new_id}
    assert sorted(_train_losses(out)) == [1, 2]                         # the old run's records are gone
    assert json.loads((out / "result.json").read_text())["start_step"] == 0


def test_overwrite_killed_while_deleting_leaves_no_checkpoint_behind(tmp_path, old_run, monkeypatch):
    """``checkpoints/`` is renamed away before the slow delete: a kill half-way through leaves no checkpoint a later
    resume could take, and the next run removes the rest."""
    from megamix.train.checkpoint import Checkpoints

    out = _copy(old_run[1], tmp_path / "run")
    rmtree = shutil.rmtree

    def killed(path, *a, **kw):
        next(Path(path).rglob("model.pt")).unlink()    # half-way through the delete ...
        raise KeyboardInterrupt                         # ... the process dies

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        Checkpoints(out).claim(resume=False, overwrite=True)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert not (out / "checkpoints").exists() and len(list(out.glob(".deleting_checkpoints_*"))) == 1
    ck = Checkpoints(out)
    ck.claim(resume=True)
    assert not list(out.glob(".deleting_*")) and ck.candidates(ck.root) == []


def test_resume_never_falls_back_into_another_runs_checkpoint(tiny_store, tmp_path, old_run, caplog):
    """Checkpoint 4 was written by another run (e.g. copied in): the resume skips it, naming the run ids, and
    resumes this run's checkpoint 2, ending exactly as the uninterrupted run."""
    ref, ref_dir = old_run
    out = _copy(ref_dir, tmp_path / "run")
    mine = json.loads((out / "run.json").read_text())["run_id"]
    _edit_markers(out / "checkpoints" / "step_0000004", lambda doc: doc.update(run_id="f" * 32))
    with caplog.at_level("WARNING", logger="megamix"):
        res = _resume(tiny_store, out)
    warn = _resume_warning(caplog)
    assert "step_0000002" in warn and "skipped step_0000004 (written by another run" in warn
    assert "f" * 32 in warn and mine in warn
    assert res.start_step == 2 and res.weights == ref.weights and _train_losses(out) == _train_losses(ref_dir)
    # the step-4 checkpoint is this run's again
    assert {m["run_id"] for m in _markers(out / "checkpoints" / "step_0000004")} == {mine}


@pytest.mark.parametrize("before", ["no_run_ids_nor_checksums", "no_run_json"])
def test_checkpoints_from_before_run_ids_are_the_runs_own(tiny_store, tmp_path, old_run, before):
    """Markers without run id and checksums (older megamix) are resumed as before; a folder without ``run.json``
    takes the run id of its newest checkpoint."""
    ref, ref_dir = old_run
    out = _copy(ref_dir, tmp_path / "run")
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    (out / "run.json").unlink()
    if before == "no_run_ids_nor_checksums":
        for d in (out / "checkpoints").glob("step_*"):
            _edit_markers(d, lambda doc: [doc.pop("run_id"), doc.pop("checksums")])
    res = _train(tiny_store.parent, out, "train.steps=6", "train.checkpoint_every=2")
    assert res.start_step == 4
    rid = json.loads((out / "run.json").read_text())["run_id"]
    assert (rid != old_id) if before == "no_run_ids_nor_checksums" else (rid == old_id)
    assert {m["run_id"] for m in _markers(out / "checkpoints" / "step_0000006")} == {rid}


# ------------------------------------------------------------------ checksums
@pytest.mark.parametrize("name", ["model.pt", "megamix_rank00000.pt"])
def test_same_size_garbled_file_falls_back_to_the_previous_checkpoint(tiny_store, tmp_path, old_run, caplog, name):
    ref, ref_dir = old_run
    out = _copy(ref_dir, tmp_path / "run")
    bad = out / "checkpoints" / "step_0000004" / name
    size = bad.stat().st_size
    _garble(bad)
    assert bad.stat().st_size == size
    with caplog.at_level("WARNING", logger="megamix"):
        res = _resume(tiny_store, out)
    warn = _resume_warning(caplog)
    assert f"skipped step_0000004 ({bad} does not match its checksum (corrupted))" in warn, warn
    assert res.start_step == 2 and res.weights == ref.weights and _train_losses(out) == _train_losses(ref_dir)


def test_checksums_split_over_ranks_and_cover_every_file():
    from megamix.train.markers import share

    files = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 1}
    parts = [share(files, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(files) and parts == [["a"], ["b", "e"], ["c", "d"]]
    assert share(files, 0, 1) == ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------ DeepSpeed (2 ranks, gloo, ZeRO-1)
GARBLED = "zero_pp_rank_1_mp_rank_00_optim_states.pt"



def _ds_worker(rank: int, port: int, data_dir: str, root: str) -> None:
    import logging

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    out, flag = Path(root) / "run", Path(root) / "garbled"
    ds = ("train.steps=4", "train.checkpoint_every=2", "train.micro_batch_size=2", "deepspeed.enabled=true",
          "deepspeed.zero_stage=1")
    first = _train(Path(data_dir), out, *ds, rank=rank, world_size=2)
    if rank == 0:
        _garble(out / "checkpoints" / "step_0000004" / GARBLED)
        flag.write_text("done")
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline:   # rank 1 resumes only after the damage is done
        time.sleep(0.05)
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("megamix").addHandler(handler)
    second = _train(Path(data_dir), out, *ds, rank=rank, world_size=2)
    Path(root, f"rank{rank}.json").write_text(json.dumps({
        "first": first.step_losses, "start": second.start_step, "second": second.step_losses, "warnings": seen}))


# slow (about 25 s idle): the plain-backend garble tests above run in the default suite
@pytest.mark.slow
def test_deepspeed_same_size_garbled_engine_file_falls_back(tiny_store, tmp_path):
    pytest.importorskip("deepspeed")
    spawn(_ds_worker, (_free_port(), str(tiny_store.parent), str(tmp_path)), 2)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    bad = tmp_path / "run" / "checkpoints" / "step_0000004" / GARBLED
    warn = [w for w in r[0]["warnings"] if "resuming from" in w]
    assert len(warn) == 1 and f"skipped step_0000004 ({bad} does not match its checksum (corrupted))" in warn[0], \
        r[0]["warnings"]
    for x in r:
        assert x["start"] == 2 and x["second"] == x["first"][2:]     # resumed exactly from checkpoint 2

"""Kill/resume torture: SIGKILL a real ``megamix train`` process (1 rank, plain backend) or a 2-rank
``torchrun`` DeepSpeed launch (gloo, ZeRO-1) at random steps and inside the checkpoint-writing window, resume
it, and check that the result is bit-identical to an uninterrupted run: every step's training loss, the
weight history, the final weights and the final model tensors.

Kills come two ways:
- at a named point of a checkpoint save: such a launch runs ``tests/killpoint.py`` (the real CLI, whose ``train``
  gets a checkpoint hook) with ``MEGAMIX_TEST_KILL_AT=PHASE@STEP[@RANK]``: e.g. ``model_saved@4@1`` kills rank 1
  after DeepSpeed's engine files of step 4 and before megamix's side files;
- from outside, ``SIGKILL`` to the launcher and every process under it (torchrun's workers included) a random
  delay after ``metrics.jsonl`` shows a chosen step (anywhere: a step, an evaluation, a save, start-up).

The default suite runs 3 kills (2 plain, 1 DeepSpeed inside the window); ``-m slow`` runs random sweeps with
more. Each test prints "N kills survived out of N". ``MEGAMIX_TORTURE_SEED`` changes the random schedule (the
schedule is printed, so a failure can be replayed).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from killpoint import KILL_ENV
from megamix.config import MegamixConfig

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("MEGAMIX_TORTURE_SEED", "0"))


def _config(data_dir: Path, path: Path, steps: int, *extra: str) -> Path:
    cfg = MegamixConfig.from_yaml(None, [
        f"data.data_dir={data_dir}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32",
        f"train.steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=0.003",
        "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1",
        "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.threads=1", "projection.k1=8",
        "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=3", "mixing.min_weight=0.02", *extra]).validate()
    path.write_text(cfg.to_yaml())
    return path


def _env(kill_at: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return env


def _cmd(cfg: Path, out: Path, nproc: int, kill_at: str | None = None) -> list[str]:
    """The launch command: ``megamix train``, or with ``kill_at`` the same through tests/killpoint.py."""
    entry = [str(ROOT / "tests" / "killpoint.py")] if kill_at else ["-m", "megamix"]
    args = [*entry, "train", "--config", str(cfg), "--set", f"train.out_dir={out}", "--no-progress"]
    if nproc == 1:
        return [sys.executable, *args]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc_per_node", str(nproc), *args]


def _new_train_steps(out: Path, since: float) -> list[int]:
    """Steps of the ``train`` records ``metrics.jsonl`` got after time ``since`` (torn lines ignored)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "train" and r.get("time", since) >= since:
            steps.append(int(r["step"]))
    return steps


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts its workers in sessions of their own, so killing the
    launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the launch and every process under it at once (a node going down), then wait until all are gone."""
    pids = _tree(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and p != pid for p in pids):
        time.sleep(0.05)


def _launch(cfg: Path, out: Path, nproc: int, *, kill_at: str | None = None, kill_after: int | None = None,
            delay: float = 0.0, timeout: float = 600) -> dict:
    """One ``megamix train`` launch. ``kill_at``: the hook spec; ``kill_after``: SIGKILL the process group
    ``delay`` s after metrics.jsonl shows that step. Returns rc, whether it was killed, and its output."""
    n = len(list(out.parent.glob(f"{out.name}.launch*.log")))
    log_path = out.parent / f"{out.name}.launch{n}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(_cmd(cfg, out, nproc, kill_at), cwd=ROOT, env=_env(kill_at), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while p.poll() is None:
            if time.time() - t0 > timeout:
                _kill_tree(p.pid)
                raise AssertionError(f"megamix train did not finish in {timeout}s; see {log_path}")
            if kill_after is not None and any(s >= kill_after for s in _new_train_steps(out, t0)):
                time.sleep(delay)
                if p.poll() is None:
                    _kill_tree(p.pid)
                    killed = True
                break
            time.sleep(0.05)
        rc = p.wait()
    text = log_path.read_text()
    if kill_at and (rc == -signal.SIGKILL or (nproc > 1 and "Signal 9 (SIGKILL)" in text)):
        killed = True  # the hook fired (torchrun reports a worker's SIGKILL and exits 1)
    return {"rc": rc, "killed": killed, "log": text, "log_path": log_path}


def _final(out: Path) -> dict:
    """What must be bit-identical to the uninterrupted run."""
    res = json.loads((out / "result.json").read_text())
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            losses[r["step"]] = r["loss"]  # the last record of a step wins
    d = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    if (d / "model.pt").exists():
        tensors = torch.load(d / "model.pt", weights_only=False)["model"]
    else:
        tensors = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {"weights": res["weights"], "weight_history": res["weight_history"], "steps": res["steps"],
            "losses": losses, "tensors": tensors}


def _assert_identical(got: dict, ref: dict) -> None:
    assert got["steps"] == ref["steps"]
    assert got["losses"] == ref["losses"], "per-step training losses differ from the uninterrupted run"
    assert got["weight_history"] == ref["weight_history"] and got["weights"] == ref["weights"]
    assert got["tensors"].keys() == ref["tensors"].keys()
    for k in ref["tensors"]:
        assert torch.equal(got["tensors"][k], ref["tensors"][k]), k


def _complete_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip()[5:]) if latest.exists() else 0


def _torture(cfg: Path, out: Path, nproc: int, kills: list[dict], steps: int) -> tuple[int, list[str]]:
    """Run the kill schedule then resume to the end; returns (kills that happened, what was done)."""
    done, story = 0, []
    for k in kills:
        r = _launch(cfg, out, nproc, **k)
        story.append(f"{k} -> rc {r['rc']}{' (killed)' if r['killed'] else ''}, latest step {_complete_step(out)}")
        assert "Traceback" not in r["log"] or r["killed"], r["log"][-3000:]
        if not r["killed"]:
            assert r["rc"] == 0, r["log"][-3000:]
            break
        done += 1
    r = _launch(cfg, out, nproc)
    story.append(f"final resume -> rc {r['rc']}")
    assert r["rc"] == 0 and "Traceback" not in r["log"], r["log"][-3000:]
    return done, story


def _report(name: str, survived: int, total: int, story: list[str]) -> None:
    print(f"\ntorture {name} (seed {SEED}): " + "\n  ".join(story))
    print(f"torture {name}: {survived} kills survived out of {total}")


# -------------------------------------------------------------------------------------------- default suite
def test_plain_kills_inside_the_save_and_at_a_random_step(tiny_store, tmp_path):
    from megamix.train.loop import train

    steps = 8
    cfg = _config(tiny_store.parent, tmp_path / "c.yaml", steps)
    ref_out = tmp_path / "ref"
    train(MegamixConfig.from_yaml(cfg, [f"train.out_dir={ref_out}"]), progress=False, log_to_stdout=False)
    ref = _final(ref_out)
    rng = random.Random(SEED)
    kills = [{"kill_at": "model_saved@4"},                                  # model.pt written, side files not
             {"kill_after": rng.randint(5, 7), "delay": rng.uniform(0.0, 0.3)}]
    out = tmp_path / "run"
    n, story = _torture(cfg, out, 1, kills, steps)
    _assert_identical(_final(out), ref)
    assert n == 2, story
    _report("plain x1", n, len(kills), story)


def test_deepspeed_kill_between_engine_files_and_side_files(tiny_store, tmp_path):
    """Rank 1 dies after DeepSpeed wrote step 4's engine files and before megamix's side files. The resume
    says checkpoint 4 is incomplete (not that the world size changed), restarts from 2, and reproduces the
    first life exactly: its per-step losses and weight updates, and step 4's engine model state."""
    pytest.importorskip("deepspeed")
    steps = 6
    cfg = _config(tiny_store.parent, tmp_path / "c.yaml", steps, "deepspeed.enabled=true",
                  "train.keep_checkpoints=0")
    out = tmp_path / "run"
    first = _launch(cfg, out, 2, kill_at="model_saved@4@1")
    assert first["killed"] and _complete_step(out) == 2, first["log"][-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_losses = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    first_weights = [(r["step"], r["weights"]) for r in recs if r["kind"] == "weights"]
    assert sorted(first_losses) == [1, 2, 3, 4]
    engine_4 = torch.load(out / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    r = _launch(cfg, out, 2)
    assert r["rc"] == 0, r["log"][-3000:]
    warn = [line for line in r["log"].splitlines() if "resuming from" in line]
    assert len(warn) == 1 and "step_0000002: skipped step_0000004 (" in warn[0], r["log"][-3000:]
    assert "did not finish writing it" in warn[0] or "holds no megamix state" in warn[0]
    assert "world size" not in warn[0] and "config error" not in r["log"]
    final = _final(out)
    assert {s: final["losses"][s] for s in first_losses} == first_losses
    assert [(w["step"], w["weights"]) for w in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if w["kind"] == "weights" and w["step"] <= 4] == first_weights
    again_4 = torch.load(out / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    assert all(torch.equal(again_4[k], engine_4[k]) for k in engine_4)
    assert final["steps"] == steps and sorted(final["losses"]) == list(range(1, steps + 1))
    _report("deepspeed x2 (ZeRO-1)", 1, 1, [f"model_saved@4@1 -> killed; {warn[0].strip()}"])


# -------------------------------------------------------------------------------------------- slow sweeps
def _schedule(rng: random.Random, steps: int, n: int, nproc: int) -> list[dict]:
    """Up to n kills with increasing targets, a few steps apart: hook kills at a random phase/rank of one of
    the next two checkpoint steps, or external kills a random delay after a random step."""
    from megamix.train.checkpoint import PHASES

    kills, at = [], 1
    for _ in range(n):
        if at >= steps:
            break
        if rng.random() < 0.5:
            s = rng.choice([c for c in range(2, steps + 1, 2) if c > at][:2] or [steps])
            rank = rng.randrange(nproc)
            phase = rng.choice(PHASES if rank == 0 else PHASES[:-1])  # only rank 0 writes `latest`
            kills.append({"kill_at": f"{phase}@{s}" + (f"@{rank}" if nproc > 1 else "")})
            at = s
        else:
            s = rng.randint(at, min(at + 2, steps - 1))
            kills.append({"kill_after": s, "delay": rng.uniform(0.0, 0.5)})
            at = s + 1
    return kills


@pytest.mark.slow
def test_plain_random_kill_sweep(tiny_store, tmp_path):
    from megamix.train.loop import train

    steps = 12
    cfg = _config(tiny_store.parent, tmp_path / "c.yaml", steps)
    ref_out = tmp_path / "ref"
    train(MegamixConfig.from_yaml(cfg, [f"train.out_dir={ref_out}"]), progress=False, log_to_stdout=False)
    ref = _final(ref_out)
    rng = random.Random(SEED + 1)
    survived = total = 0
    story: list[str] = []
    for round_ in range(3):
        out = tmp_path / f"run{round_}"
        n, s = _torture(cfg, out, 1, _schedule(rng, steps, 4, 1), steps)
        _assert_identical(_final(out), ref)
        survived, total, story = survived + n, total + n, story + s
    assert total >= 6, story
    _report("plain x1 sweep", survived, total, story)


@pytest.mark.slow
def test_deepspeed_random_kill_sweep(tiny_store, tmp_path):
    pytest.importorskip("deepspeed")
    steps = 8
    cfg = _config(tiny_store.parent, tmp_path / "c.yaml", steps, "deepspeed.enabled=true")
    ref_out = tmp_path / "ref"
    assert _launch(cfg, ref_out, 2)["rc"] == 0
    ref = _final(ref_out)
    rng = random.Random(SEED + 2)
    survived = total = 0
    story: list[str] = []
    for round_ in range(2):
        out = tmp_path / f"run{round_}"
        n, s = _torture(cfg, out, 2, _schedule(rng, steps, 3, 2), steps)
        _assert_identical(_final(out), ref)
        survived, total, story = survived + n, total + n, story + s
    assert total >= 3, story
    _report("deepspeed x2 sweep", survived, total, story)

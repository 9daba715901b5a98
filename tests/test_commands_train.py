"""`megamix train` (megamix/commands/train.py): the dry run reports the derived geometry once, SIGUSR1 makes a real
run save a checkpoint at the next step boundary and stop (and the next run resumes there), and a failed write is
named by the run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, data_dir: Path, **train) -> Path:
    cfg = {"data": {"data_dir": str(data_dir)},
           "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "seq_len": 32},
           "train": {"steps": 500, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0,
                     "eval_every": 0, "eval_batches": 1, "log_every": 1, "checkpoint_every": 0,
                     "out_dir": str(tmp_path / "run"), "loss_impl": "torch", **train},
           "mixing": {"strategy": "static"}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _train_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("kind") == "train":
            out.append(rec["step"])
    return out


def test_dry_run_prints_geometry_once_and_deepspeed_config(tiny_store, tmp_path, monkeypatch, capsys):
    from megamix.cli import main

    cfg = _cfg(tmp_path, tiny_store.parent, global_batch_size=8)
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("# geometry:") == 1
    assert "global_batch_size 8 = micro_batch_size 2 x world_size 1 x gradient_accumulation_steps 4" in out
    assert "# deepspeed config:" not in out
    # under a 2-rank launcher environment with DeepSpeed: the engine's JSON config, as the run would build it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", str(cfg), "--set", "deepspeed.enabled=true", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("# deepspeed config: "))
    ds = json.loads(line[len("# deepspeed config: "):])
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    # rank 1 checks the same things and prints nothing
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", str(cfg), "--set", "deepspeed.enabled=true", "--dry-run"]) == 0
    assert capsys.readouterr().out == ""


def test_sigusr1_saves_a_checkpoint_and_stops_then_resumes(tiny_store, tmp_path):
    cfg = _cfg(tmp_path, tiny_store.parent)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megamix", "train", "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while len(_train_steps(run / "metrics.jsonl")) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "got SIGUSR1" in err and "stopped on request after step" in err
    step = int(err.split("stopped on request after step ")[1].split(";")[0])
    assert 2 <= step < 500
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"
    assert (run / "checkpoints" / f"step_{step:07d}" / "megamix_rank00000.pt").is_file()
    assert not (run / "result.json").exists(), "a stopped run is not a finished run"
    # the next run resumes from that checkpoint
    from megamix.cli import main
    assert main(["train", "--config", str(cfg), "--no-progress", "--set", f"train.steps={step + 2}"]) == 0
    res = json.loads((run / "result.json").read_text())
    assert res["start_step"] == step and res["steps"] == step + 2


def test_stop_flag_second_signal_kills(tmp_path):
    """The first SIGTERM only asks for a checkpoint; a second one terminates at once."""
    code = ("import os, signal, time\n"
            "from megamix.commands.train import StopFlag\n"
            "f = StopFlag().install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.1)\n"
            "assert f() and f.signum == signal.SIGTERM\n"
            "print('asked', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('survived')\n")
    p = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "asked", p.stderr[-2000:]
    assert p.returncode == -signal.SIGTERM


def test_write_failure_names_the_run_directory(tmp_path):
    import errno

    import torch

    from megamix.commands.train import write_failure

    # what torch.save raises when the device is full (a real short write, on /dev/full)
    with pytest.raises(RuntimeError) as exc:
        torch.save({"w": torch.zeros(4096)}, "/dev/full")
    msg = write_failure(exc.value, tmp_path / "run")
    assert msg is not None and f"train.out_dir={tmp_path / 'run'}" in msg and "free space" in msg
    try:
        with open("/dev/full", "w") as f:
            f.write("x" * 10)
    except OSError as e:
        assert e.errno == errno.ENOSPC
        msg = write_failure(e, tmp_path / "run")
    assert msg is not None and "no space left" in msg and str(tmp_path / "run") in msg
    assert write_failure(RuntimeError("CUDA out of memory"), tmp_path) is None
    assert write_failure(ValueError("x"), tmp_path) is None

"""docs/integration.md stays honest: the plain-loop example runs, and the launch scripts dry-run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.mark.parametrize("script,counter", [("plain_loop.py", "micro_steps_captured"),
                                            ("hf_fused_loop.py", "fused_forwards")])
def test_single_process_example_runs(tiny_store, tmp_path, script, counter):
    """examples/plain_loop.py (capture path) and examples/hf_fused_loop.py (the fused one-line patch)."""
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--data-dir",
                           str(tiny_store.parent), "--steps", "4", "--update-every", "2", "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert [h["step"] for h in s["history"]] == [2, 4]
    assert s[counter] == 4 * 2  # 4 steps x 2 micro-batches went through megamix's LM-head path
    assert abs(sum(s["final_weights"]) - 1) < 1e-9
    assert s["final_weights"] != s["initial_weights"], "R&B never moved the weights"


def test_deepspeed_loop_example_zero3_resumes(tiny_store, tmp_path):
    """Your own DeepSpeed loop (examples/deepspeed_loop.py): 2 gloo ranks, ZeRO-3, fused head; run to step 4
    (checkpoint), then again to step 8: it resumes at 4 and both ranks hold the same weights."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "run"
    for steps, port in (("4", "29681"), ("8", "29683")):
        proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                               str(ROOT / "examples" / "deepspeed_loop.py"), "--data-dir", str(tiny_store.parent),
                               "--zero", "3", "--steps", steps, "--out-dir", str(out)],
                              env=_env(MASTER_PORT=port, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = [json.loads((out / f"summary_rank{k}.json").read_text()) for k in range(2)]
    assert r[0]["start"] == 4 and r[0]["fused_forwards"] == 4 * 2
    assert r[0]["weights"] == r[1]["weights"] and r[0]["weight_history"] == r[1]["weight_history"]
    assert [h[0] for h in r[0]["weight_history"]][:1] == [0] and len(r[0]["weight_history"]) >= 3
    assert (out / "checkpoints" / "latest").read_text() == "step_0000008"


def test_hf_trainer_example_two_ranks_resumes(tiny_store, tmp_path):
    """examples/hf_trainer_loop.py: a real transformers.Trainer (DDP, 2 gloo ranks, fused head) to step 2, then a
    new launch resumes from checkpoint-2 to step 4: every checkpoint holds each rank's mixing state and both ranks
    end with the same weights, weight history and parameters."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "run"
    for extra, port in ((["--steps", "2"], "29691"), (["--steps", "4", "--resume"], "29693")):
        proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                               str(ROOT / "examples" / "hf_trainer_loop.py"), "--data-dir", str(tiny_store.parent),
                               "--save-steps", "2", "--out-dir", str(out), *extra],
                              env=_env(MASTER_PORT=port), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = [json.loads((out / f"summary_rank{k}.json").read_text()) for k in range(2)]
    assert r[0]["resumed_from"].endswith("checkpoint-2") and r[0]["global_step"] == 4 and r[0]["path"] == "fused"
    assert r[0]["weight_history"] == r[1]["weight_history"] and [s for s, _ in r[0]["weight_history"]] == [0, 2, 4]
    assert abs(r[0]["param_checksum"] - r[1]["param_checksum"]) < 1e-6 * abs(r[0]["param_checksum"])
    assert r[0]["logged_weights"]["4"] == {f"megamix/weight/{d}": w for d, w in zip(r[0]["domains"], r[0]["weights"])}
    for step in (2, 4):
        assert sorted(p.name for p in (out / f"checkpoint-{step}").glob("megamix_rank*.pt")) == \
            ["megamix_rank00000.pt", "megamix_rank00001.pt"]
    assert r[0]["eval_loss"] == r[0]["eval_loss"] and r[0]["eval_loss"] < 20


def test_accelerate_example_resumes_exactly(tiny_store, tmp_path):
    """examples/accelerate_loop.py (Accelerator, no Trainer; capture path): 4 steps with checkpoints at 2 and 4;
    drop checkpoint-4 and resume from checkpoint-2: the same weight history, losses and parameters."""
    out = tmp_path / "run"

    def launch(*extra: str) -> dict:
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "accelerate_loop.py"), "--data-dir",
                               str(tiny_store.parent), "--steps", "4", "--save-every", "2", "--capture",
                               "--out-dir", str(out), *extra], env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads((out / "summary_rank0.json").read_text())

    straight = launch()
    assert straight["path"] == "capture" and [s for s, _ in straight["weight_history"]] == [0, 2, 4]
    assert (out / "checkpoint-2" / "megamix_rank00000.pt").is_file()
    shutil.rmtree(out / "checkpoint-4")
    resumed = launch("--resume")
    assert resumed["start"] == 2
    assert resumed["weight_history"] == straight["weight_history"]
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) > 2}
    assert resumed["param_checksum"] == straight["param_checksum"]


def test_docs_reference_existing_files():
    doc = (ROOT / "docs" / "integration.md").read_text()
    for rel in ("examples/plain_loop.py", "examples/megatron_pretrain_gpt_patch.md", "launch/torchrun.sh",
                "launch/deepspeed.sh", "launch/slurm.sbatch", "launch/hostfile.example"):
        assert rel in doc, rel
        assert (ROOT / rel).exists(), rel
    for line in ("hook = attach(model, mixer)", "hook.set_batch(batch)", "hook.after_optimizer_step(step)"):
        assert line in doc and line in (ROOT / "examples" / "plain_loop.py").read_text(), line


def _write_cfg(tmp_path: Path, data_dir: Path, **over) -> Path:
    import yaml
    cfg = {"data": {"data_dir": str(data_dir)}, "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "seq_len": 32},
           "train": {"global_batch_size": 8, "micro_batch_size": 2, "steps": 2, "out_dir": str(tmp_path / "run")},
           "deepspeed": {"enabled": True, "zero_stage": 1}}
    for k, v in over.items():
        sec, key = k.split("__")
        cfg.setdefault(sec, {})[key] = v
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _megamix_train_available() -> bool:
    return (ROOT / "megamix" / "commands" / "train.py").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_torchrun_script_dry_run(tiny_store, tmp_path):
    if not _megamix_train_available():
        pytest.skip("megamix train command not present")
    cfg = _write_cfg(tmp_path, tiny_store.parent)
    # extra arguments reach `megamix train` (after the script's own, so a later --set wins)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--set", "train.steps=7"], capture_output=True,
                          text=True, timeout=180, cwd=tmp_path,
                          env=_env(CONFIG=str(cfg), NPROC="2", DRY_RUN="1", MASTER_PORT="29671"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("dry run OK: backend=deepspeed, world_size=2") == 1  # rank 0 reports, every rank checks
    assert "  steps: 7\n" in proc.stdout
    # the derived geometry, once: 8 = 2 per micro-batch x 2 ranks x 2 accumulation steps
    assert proc.stdout.count("# geometry:") == 1 and "gradient_accumulation_steps 2" in proc.stdout
    assert proc.stdout.count("# deepspeed config:") == 1


def test_cli_dry_run_reports_geometry_error(tiny_store, tmp_path, monkeypatch, capsys):
    """`megamix train --dry-run` under a 2-rank launcher environment rejects an indivisible batch."""
    if not _megamix_train_available():
        pytest.skip("megamix train command not present")
    from megamix.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", str(_write_cfg(tmp_path, tiny_store.parent)), "--dry-run"]) == 0
    assert "dry run OK: backend=deepspeed, world_size=2" in capsys.readouterr().out
    bad = _write_cfg(tmp_path, tiny_store.parent, train__global_batch_size=6)
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    assert "divisible" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_deepspeed_launcher_script_dry_run(tiny_store, tmp_path):
    if not _megamix_train_available():
        pytest.skip("megamix train command not present")
    pytest.importorskip("deepspeed")
    cfg = _write_cfg(tmp_path, tiny_store.parent)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh")], capture_output=True, text=True,
                          timeout=180, env=_env(CONFIG=str(cfg), NUM_GPUS="2", DRY_RUN="1", MASTER_PORT="29673"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("dry run OK: backend=deepspeed, world_size=2") == 1  # rank 0 reports, every rank checks
    # the hostfile (multi-node) path, run per node without ssh
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh")], capture_output=True, text=True,
                          timeout=180, env=_env(CONFIG=str(cfg), HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK="0",
                                                MASTER_ADDR="127.0.0.1", DRY_RUN="1", MASTER_PORT="29675"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("dry run OK: backend=deepspeed, world_size=2") == 1  # rank 0 reports, every rank checks


def test_slurm_script_syntax_and_header():
    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes" in script and "DRY_RUN" in script and "torchrun" in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")]).returncode == 0

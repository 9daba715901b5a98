"""The launch scripts (launch/*.sh, launch/slurm.sbatch): argument forwarding, no silent backend override, SLURM from
any submit directory with its log directory created first, and the requeue trap (SIGUSR1 -> checkpoint -> requeue).

SLURM is simulated: the batch script runs under bash from a spool copy with SLURM_* variables set, and small
stand-ins for srun/scontrol/sbatch record what they were asked. The slow tests launch real torchrun ranks."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["common.sh", "torchrun.sh", "deepspeed.sh", "slurm.sbatch", "submit.sh"]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fakes(tmp: Path) -> Path:
    """A bin/ folder with stand-ins: torchrun/deepspeed/sbatch print their arguments (one per line, after a
    marker) and the working directory; srun runs its command (the real one forwards signals to it); scontrol
    answers `show hostnames` and logs `requeue`."""
    b = tmp / "bin"
    b.mkdir()
    record = ('#!/usr/bin/env bash\n'
              'echo "== $(basename "$0") in $PWD"\n'
              'for a in "$@"; do echo "$a"; done\n'
              'echo "MEGAMIX_HOME=${MEGAMIX_HOME:-}"\n'
              'echo "PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-}"\n'
              'echo "PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-}"\n')
    for name in ("torchrun", "deepspeed", "sbatch"):
        _exe(b / name, record)
    _exe(b / "srun", '#!/usr/bin/env bash\nwhile [[ "${1:-}" == -* ]]; do shift; done\nexec "$@"\n')
    _exe(b / "scontrol", '#!/usr/bin/env bash\n'
                         'if [[ "$1" == show ]]; then echo "${FAKE_HOSTS:-node-a}"; echo node-b; exit 0; fi\n'
                         'echo "$*" >> "$FAKE_SLURM_LOG"\n')
    return b


def _env(tmp: Path, bin_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMIX_HOME"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = env.get("VIRTUAL_ENV", str(Path(sys.executable).parent.parent))  # no venv activation
    env["FAKE_SLURM_LOG"] = str(tmp / "scontrol.log")
    env["CONFIG"] = str(ROOT / "configs" / "tiny-cpu.yaml")
    env.pop("BACKEND", None)
    env.pop("SETS", None)
    env.pop("DRY_RUN", None)
    env.update(extra)
    return env


def _recorded(stdout: str, name: str) -> tuple[str, list[str], dict]:
    """(working directory, arguments, reported env) of the fake ``name``."""
    block = stdout.split(f"== {name} in ", 1)[1].splitlines()
    cwd, rest = block[0], block[1:]
    reported = re.compile(r"^(MEGAMIX_HOME|PET_SIGNALS_TO_HANDLE|PET_SHUTDOWN_TIMEOUT)=")
    args = [a for a in rest if not reported.match(a)]
    env = dict(a.split("=", 1) for a in rest if reported.match(a))
    return cwd, args, env


# ------------------------------------------------------------------------------------------------ static checks
@needs_bash
def test_scripts_parse_and_pass_shellcheck():
    for s in SCRIPTS:
        assert subprocess.run(["bash", "-n", str(LAUNCH / s)]).returncode == 0, s
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    p = subprocess.run(["shellcheck", "-x", *[f"launch/{s}" for s in SCRIPTS]], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout[-4000:]


def test_slurm_header_signals_requeue_and_logs_to_an_existing_directory():
    head = [ln for ln in (LAUNCH / "slurm.sbatch").read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in head and "#SBATCH --requeue" in head
    out = next(ln for ln in head if ln.startswith("#SBATCH --output="))
    assert "/" not in out.split("=", 1)[1], "sbatch opens --output before the job starts: no directory in the default"


def test_readme_hostfile_example_matches_a_file():
    """`HOSTFILE=launch/hostfile` in the docs names a file that exists, or the docs say to copy the example."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path in set(re.findall(r"HOSTFILE=(\S+)", text)):
            if path.startswith(("<", "$", "/")):
                continue
            assert (ROOT / path).exists() or f"cp launch/hostfile.example {path}" in text, (doc.name, path)


def test_bench_loader_help(capsys):
    from megamix.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "loader", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--repeats" in out


# ------------------------------------------------------------------------------------------------ forwarding
@needs_bash
def test_torchrun_and_deepspeed_scripts_forward_arguments(tmp_path):
    b = _fakes(tmp_path)
    extra = ["--set", "train.steps=3", "--set", "mixing.strategy=static"]
    for script, fake in (("torchrun.sh", "torchrun"), ("deepspeed.sh", "deepspeed")):
        p = subprocess.run(["bash", str(LAUNCH / script), *extra], env=_env(tmp_path, b, NPROC="2", NUM_GPUS="2"),
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        _, args, env = _recorded(p.stdout, fake)
        i = args.index("megamix")
        train = args[i + 1:]
        assert train[:3] == ["train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml")]
        assert train[-len(extra):] == extra, train          # forwarded unchanged, last (a later --set wins)
        assert not any(a.startswith("deepspeed.backend=") for a in train), "the YAML's backend is not overridden"
        if fake == "torchrun":
            assert "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"].split(",")   # torchrun's --signals-to-handle
            assert env["PET_SHUTDOWN_TIMEOUT"] == "110"                     # torchrun's --shutdown-timeout
    # BACKEND set: passed on, and said so
    p = subprocess.run(["bash", str(LAUNCH / "torchrun.sh")], env=_env(tmp_path, b, NPROC="2", BACKEND="gloo"),
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    _, args, _ = _recorded(p.stdout, "torchrun")
    assert "deepspeed.backend=gloo" in args
    assert "BACKEND=gloo overrides deepspeed.backend" in p.stderr


# ------------------------------------------------------------------------------------------------ SLURM
def _spool(tmp: Path) -> Path:
    """SLURM runs a copy of the batch script from its spool directory."""
    d = tmp / "spool" / "job42"
    d.mkdir(parents=True)
    return Path(shutil.copy(LAUNCH / "slurm.sbatch", d / "slurm_script"))


def _slurm_env(tmp: Path, b: Path, submit_dir: Path, **extra) -> dict:
    return _env(tmp, b, SLURM_SUBMIT_DIR=str(submit_dir), SLURM_JOB_ID="42", SLURM_NNODES="1",
                SLURM_JOB_NODELIST="node-[a-b]", GPUS_PER_NODE="2", **extra)


@needs_bash
def test_slurm_script_runs_from_any_submit_directory(tmp_path):
    b = _fakes(tmp_path)
    script = _spool(tmp_path)
    elsewhere = tmp_path / "submitted_here"
    elsewhere.mkdir()
    # submitted outside the checkout without MEGAMIX_HOME: one clear line
    p = subprocess.run(["bash", str(script)], env=_slurm_env(tmp_path, b, elsewhere), capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert "MEGAMIX_HOME" in p.stderr and "launch/submit.sh" in p.stderr and "Traceback" not in p.stderr
    # with MEGAMIX_HOME (what submit.sh exports): runs in the submit directory, arguments forwarded
    p = subprocess.run(["bash", str(script), "--set", "train.steps=3"],
                       env=_slurm_env(tmp_path, b, elsewhere, MEGAMIX_HOME=str(ROOT)),
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    cwd, args, env = _recorded(p.stdout, "torchrun")
    assert cwd == str(elsewhere)
    assert args[-2:] == ["--set", "train.steps=3"] and "--rdzv_endpoint" in args
    assert args[args.index("--rdzv_endpoint") + 1] == "node-a:29500"
    assert env["MEGAMIX_HOME"] == str(ROOT) and "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"]
    # submitted from the checkout itself: found without MEGAMIX_HOME
    p = subprocess.run(["bash", str(script)], env=_slurm_env(tmp_path, b, ROOT), capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "scontrol.log").exists(), "no requeue without the signal"


@needs_bash
def test_submit_creates_the_log_directory_before_sbatch(tmp_path):
    b = _fakes(tmp_path)
    # the fake sbatch fails unless the --output directory exists when it is called, as a real job would
    _exe(b / "sbatch", '#!/usr/bin/env bash\n'
                       'out=""; prev=""; for a in "$@"; do [[ "$prev" == --output ]] && out="$a"; prev="$a"; done\n'
                       '[[ -d "$(dirname "$out")" ]] || { echo "no log dir" >&2; exit 1; }\n'
                       'echo "== sbatch in $PWD"; for a in "$@"; do echo "$a"; done\n'
                       'echo "MEGAMIX_HOME=${MEGAMIX_HOME:-}"\n')
    sub = tmp_path / "anywhere"
    sub.mkdir()
    p = subprocess.run(["bash", str(LAUNCH / "submit.sh"), "--nodes", "4", "--", "--set", "train.steps=5"],
                       env=_env(tmp_path, b), capture_output=True, text=True, cwd=sub, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (sub / "logs").is_dir()
    _, args, env = _recorded(p.stdout, "sbatch")
    assert args == ["--output", "logs/%x-%j.out", "--nodes", "4", str(LAUNCH / "slurm.sbatch"), "--set",
                    "train.steps=5"]
    assert env["MEGAMIX_HOME"] == str(ROOT)


@needs_bash
def test_slurm_usr1_trap_forwards_then_requeues(tmp_path):
    """SIGUSR1 to the batch script reaches the training process (through srun), the script waits for it to exit,
    then requeues the job."""
    b = _fakes(tmp_path)
    # a stand-in for torchrun + ranks: waits for SIGUSR1, "checkpoints", exits 0
    _exe(b / "torchrun", f'#!{sys.executable}\n'
                         'import os, signal, sys, time\n'
                         'got = []\n'
                         'signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n'
                         'open(os.environ["READY_FILE"], "w").write(str(os.getpid()))\n'
                         'deadline = time.time() + 60\n'
                         'while not got and time.time() < deadline: time.sleep(0.05)\n'
                         'time.sleep(0.5)  # the checkpoint takes a while; the script must wait for it\n'
                         'open(os.environ["DONE_FILE"], "w").write("checkpointed" if got else "timeout")\n')
    ready, done = tmp_path / "ready", tmp_path / "done"
    env = _slurm_env(tmp_path, b, ROOT, READY_FILE=str(ready), DONE_FILE=str(done))
    proc = subprocess.Popen(["bash", str(_spool(tmp_path))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # what SLURM does 120 s before the time limit (--signal=B:USR1@120)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert done.read_text() == "checkpointed"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]
    assert err.index("SIGUSR1") < err.index("requeueing job 42")


# ------------------------------------------------------------------------------------------------ real ranks
def _tiny_cfg(tmp_path: Path, data_dir: Path) -> Path:
    cfg = {"data": {"data_dir": str(data_dir)}, "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "seq_len": 32},
           "train": {"steps": 400, "global_batch_size": 4, "micro_batch_size": 1, "warmup_steps": 0, "eval_every": 0,
                     "eval_batches": 1, "log_every": 1, "checkpoint_every": 0, "out_dir": str(tmp_path / "run"),
                     "loss_impl": "torch"},
           "mixing": {"strategy": "static"}, "deepspeed": {"zero_stage": 1}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _steps_logged(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    n = 0
    for line in metrics.read_text().splitlines():
        try:
            n += json.loads(line).get("kind") == "train"
        except json.JSONDecodeError:
            pass
    return n


@pytest.mark.slow
@needs_bash
def test_torchrun_usr1_checkpoints_every_rank_and_resumes(tiny_store, tmp_path):
    """launch/torchrun.sh with 2 DeepSpeed ranks: SIGUSR1 to torchrun reaches both ranks, which stop at the same step
    with a complete checkpoint; the same command with more steps resumes there."""
    cfg = _tiny_cfg(tmp_path, tiny_store.parent)
    env = {**os.environ, "CONFIG": str(cfg), "NPROC": "2", "MASTER_PORT": "29691", "DS_ACCELERATOR": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), "--no-progress"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while _steps_logged(tmp_path / "run" / "metrics.jsonl") < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)  # bash exec'd torchrun: this is torchrun's pid
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped on request after step" in err, err[-4000:]
    step = int(err.split("stopped on request after step ")[1].split(";")[0])
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step_{step:07d}"
    assert sorted(p.name for p in (ck / f"step_{step:07d}").glob("megamix_rank*.pt")) == \
        ["megamix_rank00000.pt", "megamix_rank00001.pt"]
    p = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "--no-progress", "--set", f"train.steps={step + 1}"],
                       env={**env, "MASTER_PORT": "29693"}, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["start_step"] == step and res["steps"] == step + 1 and res["world_size"] == 2


@pytest.mark.slow
@needs_bash
def test_slurm_requeue_end_to_end_with_real_ranks(tiny_store, tmp_path):
    """slurm.sbatch (spool copy, stand-in srun/scontrol, real torchrun + 2 DeepSpeed ranks): SIGUSR1 to the batch
    script -> srun -> torchrun -> ranks checkpoint and stop -> `scontrol requeue`; the requeued job resumes."""
    b = _fakes(tmp_path)
    (b / "torchrun").unlink()  # the real one
    cfg = _tiny_cfg(tmp_path, tiny_store.parent)
    env = _slurm_env(tmp_path, b, tmp_path, CONFIG=str(cfg), FAKE_HOSTS="127.0.0.1", MASTER_PORT="29695",
                     DS_ACCELERATOR="cpu", MEGAMIX_HOME=str(ROOT))
    script = _spool(tmp_path)
    proc = subprocess.Popen(["bash", str(script), "--no-progress"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while _steps_logged(tmp_path / "run" / "metrics.jsonl") < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]
    step = int(err.split("stopped on request after step ")[1].split(";")[0])
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step_{step:07d}"
    # the requeued job (SLURM_RESTART_COUNT=1) resumes from that checkpoint
    env.update(SLURM_RESTART_COUNT="1", MASTER_PORT="29697")
    p = subprocess.run(["bash", str(script), "--no-progress", "--set", f"train.steps={step + 1}"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["start_step"] == step and res["steps"] == step + 1

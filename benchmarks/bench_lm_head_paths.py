"""Step time and peak memory of the training loop's three LM-head paths, interleaved in one run.

Variants (``train.loss_impl``), each a real ``megamix train`` run through DeepSpeed launched by torchrun:

- ``torch``: no megamix: the model's logits + cross-entropy, static mixture, no statistics (baseline);
- ``capture``: the model's logits + cross-entropy, megamix statistics from the backward hook, R&B;
- ``fused``: megamix's fused LM head (no ``[B, T, V]`` logits, statistics from the CE pass), R&B.

Runs are interleaved (torch, capture, fused, torch, ...) so machine load hits every variant alike.
Each run is a fresh process group: peak RSS (rank 0) and peak CUDA memory are that run's. The first
``--warmup`` steps of every run are dropped; the reported step time is the median over the rest of all
repeats, and ratios are against the ``torch`` variant measured in the same invocation.

CPU (2 gloo ranks, the tiny-cpu model shape at GPT-2's V=50257 and at V=128256)::

    python benchmarks/bench_lm_head_paths.py --data-dir data --nproc 2 --vocab 50257,128256 \\
        --out benchmarks/results/lm_head_paths_cpu.json

GPU (one H200, ZeRO-1, bf16, seq 2048, V=128256; ~125M and ~1B GPT-2-style bodies)::

    python benchmarks/bench_lm_head_paths.py --preset gpu --data-dir data --out benchmarks/results/lm_head_paths_h200.json

The token store comes from ``megamix data build`` (GPT-2 ids, which any V >= 50257 covers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("torch", "capture", "fused")

# model shapes: name -> overrides (the tiny-cpu shape for CPU; GPT-2-style 125M / ~1B bodies for GPU)
SHAPES = {
    "tiny": ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.seq_len=128",
             "train.global_batch_size=16", "train.micro_batch_size=4"],
    "125m": ["model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.seq_len=2048",
             "train.global_batch_size=8", "train.micro_batch_size=4"],
    "1b": ["model.n_layer=24", "model.n_embd=2048", "model.n_head=16", "model.seq_len=2048",
           "train.global_batch_size=8", "train.micro_batch_size=4"],
}
PRESETS = {
    "cpu": {"shapes": ["tiny"], "vocab": [50257, 128256], "nproc": 2, "zero": 1, "dtype": "fp32", "steps": 8,
            "repeats": 2, "chunk_tokens": 4096},
    "gpu": {"shapes": ["125m", "1b"], "vocab": [128256], "nproc": 1, "zero": 1, "dtype": "bf16", "steps": 12,
            "repeats": 2, "chunk_tokens": 8192},
}


def variant_overrides(variant: str) -> list[str]:
    if variant == "torch":
        return ["train.loss_impl=torch", "projection.enabled=false", "mixing.strategy=static"]
    return [f"train.loss_impl={variant}", "projection.enabled=true", "mixing.strategy=rnb"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(out_dir: Path, overrides: list[str], nproc: int, timeout: float) -> dict:
    """One ``megamix train`` under torchrun; returns rank 0's result.json."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "megamix", "train", "--no-progress",
           "--config", str(ROOT / "configs" / "tiny-cpu.yaml")]
    for o in overrides + [f"train.out_dir={out_dir}"]:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out_dir / "result.json").read_text())


def conditions() -> dict:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for mod in ("deepspeed", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as such
            info[mod] = None
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data-dir", default="data", help="Folder with tokens/ (megamix data build).")
    ap.add_argument("--shapes", default=None, help=f"Comma-separated model shapes from {sorted(SHAPES)}.")
    ap.add_argument("--vocab", default=None, help="Comma-separated head sizes V (>= the store's vocabulary).")
    ap.add_argument("--nproc", type=int, default=None, help="Ranks (torchrun --nproc_per_node).")
    ap.add_argument("--zero", type=int, default=None, help="ZeRO stage.")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=None, help="Optimizer steps per run.")
    ap.add_argument("--warmup", type=int, default=2, help="Steps dropped at the start of every run.")
    ap.add_argument("--repeats", type=int, default=None, help="Interleaved repeats of every variant.")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], dest="sets", help="Extra config override (repeatable).")
    ap.add_argument("--timeout", type=float, default=1800.0, help="Seconds allowed per run.")
    ap.add_argument("--out", default=None, help="Write the JSON report here.")
    args = ap.parse_args(argv)
    pre = PRESETS[args.preset]
    shapes = args.shapes.split(",") if args.shapes else pre["shapes"]
    vocabs = [int(v) for v in args.vocab.split(",")] if args.vocab else pre["vocab"]
    nproc, zero = args.nproc or pre["nproc"], pre["zero"] if args.zero is None else args.zero
    dtype, steps = args.dtype or pre["dtype"], args.steps or pre["steps"]
    repeats = args.repeats or pre["repeats"]
    variants = args.variants.split(",")
    for bad in [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown shape or variant {bad!r}")
    if steps <= args.warmup:
        ap.error(f"--steps ({steps}) must exceed --warmup ({args.warmup})")
    report = {"conditions": conditions(), "preset": args.preset, "nproc": nproc, "zero_stage": zero, "dtype": dtype,
              "steps_per_run": steps, "warmup_dropped": args.warmup, "repeats": repeats, "results": []}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="megamix-bench-") as tmp:
        for shape in shapes:
            for V in vocabs:
                common = SHAPES[shape] + [
                    f"data.data_dir={Path(args.data_dir).resolve()}", f"model.vocab_size={V}", f"train.steps={steps}",
                    "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=0",
                    "train.resume=false", f"train.dtype={dtype}", "deepspeed.enabled=true", f"deepspeed.zero_stage={zero}",
                    f"deepspeed.backend={'nccl' if args.preset == 'gpu' else 'gloo'}", "mixing.update_every=2",
                    f"projection.chunk_tokens={pre['chunk_tokens']}"] + args.sets
                times = {v: [] for v in variants}
                rss = {v: [] for v in variants}
                dev = {v: [] for v in variants}
                paths = {}
                for rep in range(repeats):
                    for v in variants:
                        out = Path(tmp) / f"{shape}_V{V}_{v}_{rep}"
                        res = run_one(out, common + variant_overrides(v), nproc, args.timeout)
                        times[v] += res["step_seconds"][args.warmup:]
                        rss[v].append(res["peak_rss_mb"])
                        dev[v].append(res["peak_device_mb"])
                        paths[v] = res["lm_head_path"]
                        print(f"{shape} V={V} {v:8s} rep {rep}: median step "
                              f"{np.median(res['step_seconds'][args.warmup:]):.3f}s, peak RSS {res['peak_rss_mb']:.0f} MB",
                              flush=True)
                med = {v: float(np.median(times[v])) for v in variants}
                base = med.get("torch")
                report["results"].append({
                    "shape": shape, "vocab_size": V, "overrides": common, "lm_head_path": paths,
                    "median_step_seconds": med, "steps_measured": {v: len(times[v]) for v in variants},
                    "overhead_vs_torch": {v: (med[v] / base - 1.0) for v in variants} if base else None,
                    "peak_rss_mb_rank0": {v: float(max(rss[v])) for v in variants},
                    "peak_device_mb": {v: float(np.nanmax(dev[v])) if not all(np.isnan(dev[v])) else None
                                       for v in variants}})
    report["conditions"]["load_avg_end"] = os.getloadavg()
    report["conditions"]["wall_seconds"] = time.time() - t_start
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()

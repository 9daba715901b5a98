"""What the checkpoint checksums cost: hashing throughput, and save/load time with and without them.

    python benchmarks/checkpoint_checksum.py [--repeats 5] [--hash-mb 512] [--no-deepspeed] [--out FILE]

Three measurements, each the median of ``--repeats``:

1. **Hashing throughput** (MB/s, 1 MB = 10^6 bytes) of megamix's checksum (CRC-32, :func:`megamix.train.markers.
   file_checksum`) and, for comparison, SHA-256 and BLAKE2b, over a ``--hash-mb`` file just written (in the page
   cache, as the files are when a save hashes them), on one thread and on one thread per CPU (several files:
   a resume verifies files in parallel).
2. **The plain backend at the tiny test size** (1 layer, n_embd 32, the GPT-2 vocabulary: a 19 MB ``model.pt``
   with AdamW states): ``Checkpoints.save`` and ``Checkpoints.load`` with checksums (recorded on save, verified on
   load) and without (``Checkpoints.checksums = False``), interleaved on/off so machine load hits both alike;
   ``hash_only`` is the time to checksum that checkpoint's files alone (what a save adds, and a resume on rank 0).
3. **2-rank DeepSpeed ZeRO-1 (gloo, CPU)** at the same size, the same way (``--no-deepspeed`` skips it).

Then the estimate at 1B parameters: 16 GB of files (fp32 weights and AdamW's two fp32 states are 12
bytes/parameter, bf16 weights with fp32 master weights and states 14: 16 GB is the round upper figure).
Saving, each rank hashes its share (16 GB / ranks) right after writing it; resuming, rank 0 verifies all 16 GB,
one thread per file up to 8 (or the CPUs). The time is bytes / measured throughput; a resume from storage that no
longer caches the files also reads them once more, which costs 16 GB / the storage's read bandwidth on top (not
measured here).

Output: the JSON (``--out``, default ``benchmarks/results/checkpoint_checksum.json``) with the conditions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BYTES_1B = 16e9      # 1B parameters x ~16 bytes (weights, AdamW exp_avg and exp_avg_sq, master copy)
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32", "model.vocab_size=50257",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=0", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=0", "train.keep_checkpoints=2", "train.threads=1",
        "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=2",
        "logging.tensorboard=false"]


def conditions() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION, "tmp_dir": tempfile.gettempdir()}
    try:
        info["deepspeed"] = __import__("deepspeed").__version__
    except Exception:  # noqa: BLE001 - recorded as missing
        info["deepspeed"] = None
    return info


# ------------------------------------------------------------------------------------------- 1. throughput
def _hash_file(path: Path, algo: str) -> str:
    from megamix.train.markers import file_checksum

    return file_checksum(path, algo)


def _blob(path: Path, mb: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    return path


def bench_throughput(tmp: Path, mb: int, repeats: int) -> dict:
    """MB/s hashing one ``mb`` MiB file on one thread, and ``threads`` files of ``mb / threads`` MiB in parallel."""
    threads = max(1, min(8, os.cpu_count() or 1))
    single = _blob(tmp / "single.bin", mb)
    parts = [_blob(tmp / f"part{i}.bin", max(1, mb // threads)) for i in range(threads)]
    total = sum(p.stat().st_size for p in parts)
    out = {"file_mb": single.stat().st_size / 1e6, "threads": threads, "single_thread_mb_s": {},
           "parallel_mb_s": {}}
    for algo in ("crc32", "sha256", "blake2b"):
        _hash_file(single, algo)          # the page cache holds them (as right after a save)
        one, par = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _hash_file(single, algo)
            one.append(single.stat().st_size / 1e6 / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda p: _hash_file(p, algo), parts))
            par.append(total / 1e6 / (time.perf_counter() - t0))
        out["single_thread_mb_s"][algo] = round(statistics.median(one), 1)
        out["parallel_mb_s"][algo] = round(statistics.median(par), 1)
    for p in (single, *parts):
        p.unlink()
    return out


# ------------------------------------------------------------------------------------------- 2./3. save and load
def _trainer(data_dir: Path, out: Path, rank: int = 0, world: int = 1, *extra: str):
    from megamix.config import MegamixConfig
    from megamix.train.loop import Trainer

    cfg = MegamixConfig.from_yaml(None, [f"data.data_dir={data_dir}", f"train.out_dir={out}", "train.steps=1000",
                                         *TINY, *extra]).validate()
    tr = Trainer(cfg, rank=rank, world_size=world, progress=False, log_to_stdout=False, callbacks=[])
    tr._start()
    tr.train_step(0)          # one optimizer step: the AdamW states exist, as in every real checkpoint
    return tr, cfg


def _save_load(tr, cfg, repeats: int) -> dict:
    """Median save and load seconds with checksums on and off (interleaved), on this rank's clock after a barrier."""
    from megamix.train import markers

    b, ck = tr.backend, tr.ckpt
    t = {k: [] for k in ("save_on", "save_off", "load_on", "load_off", "hash_only")}
    step = 10
    for rep in range(repeats + 1):        # the first round warms up
        for on in (True, False):
            ck.checksums = on
            b.barrier()
            t0 = time.perf_counter()
            d = ck.save(step, b, tr.mixer, cfg)
            b.barrier()
            save = time.perf_counter() - t0
            t0 = time.perf_counter()
            ck.load(b, tr.mixer, cfg)
            b.barrier()
            load = time.perf_counter() - t0
            step += 1
            if rep:
                t[f"save_{'on' if on else 'off'}"].append(save)
                t[f"load_{'on' if on else 'off'}"].append(load)
        if rep and b.rank == 0:
            names = [p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and ".done." not in p.name]
            t0 = time.perf_counter()
            markers.checksums(d, names)
            t["hash_only"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items() if v}
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    res = {"checkpoint_bytes": size, "files": len([p for p in d.rglob("*") if p.is_file()]),
           "median_s": {k: round(v, 4) for k, v in med.items()},
           "quartiles_s": {k: [round(q, 4) for q in statistics.quantiles(v, n=4)[::2]] for k, v in t.items()
                           if len(v) > 1}}
    res["save_overhead_s"] = round(med["save_on"] - med["save_off"], 4)
    res["load_overhead_s"] = round(med["load_on"] - med["load_off"], 4)
    res["save_overhead_pct"] = round(100 * (med["save_on"] / med["save_off"] - 1), 1)
    res["load_overhead_pct"] = round(100 * (med["load_on"] / med["load_off"] - 1), 1)
    return res


def bench_plain(data_dir: Path, tmp: Path, repeats: int) -> dict:
    tr, cfg = _trainer(data_dir, tmp / "plain")
    return {"backend": "plain x1", **_save_load(tr, cfg, repeats)}


def _ds_worker(rank: int, port: int, data_dir: str, tmp: str, repeats: int) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    tr, cfg = _trainer(Path(data_dir), Path(tmp) / "ds", rank, 2, "deepspeed.enabled=true", "deepspeed.zero_stage=1")
    res = _save_load(tr, cfg, repeats)
    tr.backend.close()
    if rank == 0:
        Path(tmp, "ds.json").write_text(json.dumps({"backend": "deepspeed x2 (ZeRO-1, gloo)", **res}))


def bench_deepspeed(data_dir: Path, tmp: Path, repeats: int) -> dict | None:
    import importlib.util

    import torch.multiprocessing as mp

    if importlib.util.find_spec("deepspeed") is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ds_worker, args=(port, str(data_dir), str(tmp), repeats), nprocs=2, join=True)
    return json.loads((tmp / "ds.json").read_text())


# ------------------------------------------------------------------------------------------- the 1B estimate
def estimate_1b(tp: dict) -> dict:
    single, par = tp["single_thread_mb_s"]["crc32"] * 1e6, tp["parallel_mb_s"]["crc32"] * 1e6
    out = {"bytes": BYTES_1B, "algorithm": "crc32", "single_thread_mb_s": single / 1e6,
           "parallel_mb_s_on_this_machine": par / 1e6}
    for ranks in (1, 8):
        out[f"save_s_{ranks}_ranks"] = round(BYTES_1B / ranks / single, 1)   # each rank its share, in parallel
    out["load_verify_s_one_thread"] = round(BYTES_1B / single, 1)
    out["load_verify_s_8_threads"] = round(BYTES_1B / (8 * single), 1)        # rank 0, one thread per file
    out["load_verify_s_this_machine"] = round(BYTES_1B / par, 1)
    out["note"] = ("hash-bound times with the files in the page cache; a resume from cold storage also reads the "
                   "16 GB once more (16 GB / read bandwidth, e.g. 8 s at 2 GB/s) before the backend reads them")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hash-mb", type=int, default=512, help="size of the file hashed for the throughput")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_checksum.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megamix.data.testing import build_tiny_store

    report = {"conditions": conditions(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="megamix-ckpt-sum-") as d:
        tmp = Path(d)
        data_dir = build_tiny_store(tmp / "store").parent
        report["throughput"] = bench_throughput(tmp, args.hash_mb, args.repeats)
        print(json.dumps(report["throughput"]), flush=True)
        report["plain"] = bench_plain(data_dir, tmp, args.repeats)
        print(json.dumps(report["plain"]), flush=True)
        if not args.no_deepspeed:
            report["deepspeed"] = bench_deepspeed(data_dir, tmp, args.repeats)
            print(json.dumps(report["deepspeed"]), flush=True)
    report["estimate_1b_params"] = estimate_1b(report["throughput"])
    report["conditions"]["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["estimate_1b_params"], indent=1))
    return report


if __name__ == "__main__":
    main()

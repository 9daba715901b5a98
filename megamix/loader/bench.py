"""Loader benchmark: index generation, full batch assembly, and the cost of a weight update.

Run ``python -m megamix.loader.bench [--quick] [--out FILE]`` (or ``benchmarks/loader_bench.py``).
It prints a table and writes JSON with the median of several repeats and the conditions
(CPU count, library versions, sizes). Every timing is wall-clock ``time.perf_counter``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megamix.loader.sampler import MixtureSampler


def _median_rate(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_index_generation(num_domains: int, domain_size: int, global_batch_size: int, steps: int,
                           repeats: int, cache: bool = True, world_size: int = 1) -> dict:
    """Samples/s of ``next_step_arrays`` alone (the sampler; no token reads). Warm cache unless ``cache=False``."""
    rng = np.random.default_rng(0)
    s = MixtureSampler([domain_size] * num_domains, rng.dirichlet(np.ones(num_domains)),
                       global_batch_size=global_batch_size, seed=0, world_size=world_size,
                       cache_max_size=(1 << 22) if cache else 0, cache_budget_bytes=2 << 30)
    for _ in range(20):  # warm up (builds the cached permutations of epoch 0)
        s.next_step_arrays()

    def go():
        for _ in range(steps):
            s.next_step_arrays()
    med, times = _median_rate(go, repeats)
    return {"num_domains": num_domains, "domain_size": domain_size, "global_batch_size": global_batch_size,
            "world_size": world_size, "steps": steps, "cached_permutations": cache,
            "median_s": med, "samples_per_s": global_batch_size * steps / med,
            "us_per_step": med / steps * 1e6}


def bench_set_weights(num_domains: int, domain_size: int, updates: int, repeats: int) -> dict:
    """Median cost of one ``set_weights`` and of the first step after it (vs a steady step)."""
    rng = np.random.default_rng(1)
    s = MixtureSampler([domain_size] * num_domains, np.ones(num_domains), global_batch_size=256, seed=0,
                       cache_max_size=1 << 22, cache_budget_bytes=2 << 30)
    for _ in range(3):
        s.next_global()
    ws = [rng.dirichlet(np.ones(num_domains)) for _ in range(updates)]

    def upd():
        for w in ws:
            s.set_weights(w)
    med, _ = _median_rate(upd, repeats)
    steady, after = [], []
    for w in ws[: min(updates, 50)]:
        t0 = time.perf_counter()
        s.next_global()
        steady.append(time.perf_counter() - t0)
        s.set_weights(w)
        t0 = time.perf_counter()
        s.next_global()
        after.append(time.perf_counter() - t0)
    return {"num_domains": num_domains, "domain_size": domain_size, "updates": updates,
            "us_per_set_weights": med / updates * 1e6,
            "us_step_steady": statistics.median(steady) * 1e6,
            "us_step_after_update": statistics.median(after) * 1e6}


def bench_assembly(tokens_per_domain: int, num_domains: int, seq_len: int, global_batch_size: int,
                   micro_batch_size: int, steps: int, repeats: int, workdir: str) -> dict:
    """Samples/s of ``MixtureLoader.next_step`` (indices + memmap reads + tensors) on a synthetic store."""
    from megamix.data.store import TokenStore
    from megamix.loader.loader import MixtureLoader
    from megamix.loader.testing import build_synthetic_store

    tokens_dir = build_synthetic_store(workdir, {f"d{i}": tokens_per_domain for i in range(num_domains)},
                                       mean_doc_len=400, seed=0)
    store = TokenStore(tokens_dir)
    loader = MixtureLoader(store, seq_len=seq_len, global_batch_size=global_batch_size,
                           micro_batch_size=micro_batch_size, weights=np.ones(num_domains), seed=0)
    for _ in range(3):
        loader.next_step()

    def go():
        for _ in range(steps):
            loader.next_step()
    med, _ = _median_rate(go, repeats)
    sps = global_batch_size * steps / med
    return {"num_domains": num_domains, "tokens_per_domain": tokens_per_domain, "seq_len": seq_len,
            "global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size, "steps": steps,
            "median_s": med, "samples_per_s": sps, "tokens_per_s": sps * seq_len,
            "ms_per_step": med / steps * 1e3}


def conditions() -> dict:
    import torch
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1_5_15min": list(os.getloadavg()),
            "timer": "time.perf_counter, median of repeats",
            "note": "shared 2-core machine; other jobs may run at the same time (see load average)"}


def run(quick: bool = False, repeats: int = 5) -> dict:
    """Run every benchmark; ``quick`` shrinks sizes for a smoke run."""
    res: dict = {"conditions": conditions(), "quick": quick, "index_generation": [], "set_weights": [],
                 "assembly": []}
    idx_cases = [(10, 10**5, 512, True), (10, 10**5, 4096, True), (10, 10**12, 512, False),
                 (100, 10**5, 1024, True), (1000, 10**4, 1024, True), (1000, 10**12, 1024, False)]
    if quick:
        idx_cases = idx_cases[:1] + idx_cases[3:4]
    sw_cases = [(D, n) for D in (10, 1000) for n in (10**3, 10**12)]
    steps = 20 if quick else 100
    with tqdm(total=len(idx_cases) + len(sw_cases) + 2, desc="loader bench", file=sys.stderr) as bar:
        for D, n, B, cache in idx_cases:
            res["index_generation"].append(bench_index_generation(D, n, B, steps, repeats, cache))
            bar.update()
        for D, n in sw_cases:
            res["set_weights"].append(bench_set_weights(D, n, 100 if quick else 500, repeats))
            bar.update()
        with tempfile.TemporaryDirectory() as tmp:
            tpd = 200_000 if quick else 2_000_000
            for T, gb, mb in ((1024, 64, 8), (2048, 64, 8)):
                res["assembly"].append(bench_assembly(tpd, 8, T, gb, mb, 5 if quick else 20, repeats, tmp))
                bar.update()
    return res


def format_table(res: dict) -> str:
    lines = ["index generation (sampler only):"]
    for r in res["index_generation"]:
        lines.append(f"  D={r['num_domains']:5d} size={r['domain_size']:.0e} B={r['global_batch_size']:5d} "
                     f"cache={str(r['cached_permutations']):5s}  {r['samples_per_s']:12,.0f} samples/s  "
                     f"({r['us_per_step']:.0f} us/step)")
    lines.append("set_weights (O(D), independent of domain size):")
    for r in res["set_weights"]:
        lines.append(f"  D={r['num_domains']:5d} size={r['domain_size']:.0e}  set_weights {r['us_per_set_weights']:8.1f} us"
                     f"  step after update {r['us_step_after_update']:8.1f} us (steady {r['us_step_steady']:8.1f} us)")
    lines.append("full batch assembly (MixtureLoader.next_step, memmap reads, tensors):")
    for r in res["assembly"]:
        lines.append(f"  T={r['seq_len']} B={r['global_batch_size']} micro={r['micro_batch_size']}  "
                     f"{r['samples_per_s']:10,.0f} samples/s  {r['tokens_per_s']:14,.0f} tokens/s  "
                     f"({r['ms_per_step']:.2f} ms/step)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loader_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run of a few seconds)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per case; the median is reported")
    ap.add_argument("--out", default="benchmarks/results/loader_bench.json", help="JSON output path")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, repeats=args.repeats)
    print(format_table(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

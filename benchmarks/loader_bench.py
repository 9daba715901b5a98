"""Loader benchmark: index generation, full batch assembly, and the cost of a weight update.

    python benchmarks/loader_bench.py [--quick] [--repeats 5] [--out DIR]
    megamix bench loader [--quick] [--repeats 5] [--out DIR]        # the same script, from a source checkout

Every timing is wall-clock ``time.perf_counter``, the median of ``--repeats`` repeats, each against a baseline
timed in the same run: index generation against a naive i.i.d. draw of the same batch (numpy ``choice`` +
``integers``: no exact per-domain counts, no epoch permutations), the first step after ``set_weights`` against a
steady step, and batch assembly against index generation alone at the same batch size. The conditions (date,
CPU count, library versions, load average) are recorded with the numbers.

Output: ``<out>/loader_bench.json`` and ``<out>/loader_bench.md`` (the table printed at the end), where ``<out>``
is ``--out`` or a new run folder ``runs/bench/loader-<UTC time>/``. The committed
``benchmarks/results/loader_bench.json`` is refreshed only on purpose: ``--out benchmarks/results``.
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

from megamix.kernels.bench.output import default_out_dir, fmt, md_table
from megamix.loader.sampler import MixtureSampler

STEM = "loader_bench"


def _median_rate(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _naive_draw_s(num_domains: int, domain_size: int, global_batch_size: int, steps: int, repeats: int,
                  weights: np.ndarray) -> float:
    """Median seconds of ``steps`` naive i.i.d. draws of one global batch (the baseline of index generation)."""
    rng = np.random.default_rng(0)

    def go():
        for _ in range(steps):
            rng.choice(num_domains, size=global_batch_size, p=weights)
            rng.integers(0, domain_size, size=global_batch_size)
    go()
    return _median_rate(go, repeats)[0]


def bench_index_generation(num_domains: int, domain_size: int, global_batch_size: int, steps: int,
                           repeats: int, cache: bool = True, world_size: int = 1) -> dict:
    """Samples/s of ``next_step_arrays`` alone (the sampler; no token reads), and its time per step as a ratio
    to a naive i.i.d. draw of the same batch. Warm cache unless ``cache=False``."""
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(num_domains))
    s = MixtureSampler([domain_size] * num_domains, w, global_batch_size=global_batch_size, seed=0,
                       world_size=world_size, cache_max_size=(1 << 22) if cache else 0, cache_budget_bytes=2 << 30)
    for _ in range(20):  # warm up (builds the cached permutations of epoch 0)
        s.next_step_arrays()

    def go():
        for _ in range(steps):
            s.next_step_arrays()
    med, _ = _median_rate(go, repeats)
    naive = _naive_draw_s(num_domains, domain_size, global_batch_size, steps, repeats, w)
    return {"num_domains": num_domains, "domain_size": domain_size, "global_batch_size": global_batch_size,
            "world_size": world_size, "steps": steps, "cached_permutations": cache,
            "median_s": med, "samples_per_s": global_batch_size * steps / med,
            "us_per_step": med / steps * 1e6, "naive_us_per_step": naive / steps * 1e6,
            "ratio_vs_naive": med / naive}


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
            "us_step_after_update": statistics.median(after) * 1e6,
            "ratio_after_update_vs_steady": statistics.median(after) / statistics.median(steady)}


def bench_assembly(tokens_per_domain: int, num_domains: int, seq_len: int, global_batch_size: int,
                   micro_batch_size: int, steps: int, repeats: int, workdir: str) -> dict:
    """Samples/s of ``MixtureLoader.next_step`` (indices + memmap reads + tensors) on a synthetic store, and its
    time per step as a ratio to the sampler's index generation alone for the same batch."""
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
    idx = bench_index_generation(num_domains, tokens_per_domain // (seq_len + 1), global_batch_size, steps, repeats)
    sps = global_batch_size * steps / med
    return {"num_domains": num_domains, "tokens_per_domain": tokens_per_domain, "seq_len": seq_len,
            "global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size, "steps": steps,
            "median_s": med, "samples_per_s": sps, "tokens_per_s": sps * seq_len,
            "ms_per_step": med / steps * 1e3, "index_ms_per_step": idx["us_per_step"] / 1e3,
            "ratio_vs_index_generation": med / steps * 1e6 / idx["us_per_step"]}


def conditions() -> dict:
    import torch
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1_5_15min": list(os.getloadavg()),
            "timer": "time.perf_counter, median of repeats",
            "note": "other jobs may share the machine (see the load average)"}


def run(quick: bool = False, repeats: int = 5) -> dict:
    """Run every benchmark; ``quick`` shrinks sizes for a smoke run."""
    res: dict = {"conditions": conditions(), "quick": quick, "repeats": repeats, "index_generation": [],
                 "set_weights": [], "assembly": []}
    idx_cases = [(10, 10**5, 512, True), (10, 10**5, 4096, True), (10, 10**12, 512, False),
                 (100, 10**5, 1024, True), (1000, 10**4, 1024, True), (1000, 10**12, 1024, False)]
    if quick:
        idx_cases = idx_cases[:1] + idx_cases[3:4]
    sw_cases = [(D, n) for D in (10, 1000) for n in (10**3, 10**12)]
    steps = 20 if quick else 100
    with tqdm(total=len(idx_cases) + len(sw_cases) + 2, desc="bench loader", file=sys.stderr) as bar:
        for D, n, B, cache in idx_cases:
            res["index_generation"].append(bench_index_generation(D, n, B, steps, repeats, cache))
            bar.update()
        for D, n in sw_cases:
            res["set_weights"].append(bench_set_weights(D, n, 100 if quick else 500, repeats))
            bar.update()
        with tempfile.TemporaryDirectory() as tmp:
            tpd = 200_000 if quick else 2_000_000
            for T, gb, mb in ((1024, 64, 8), (2048, 64, 8)):
                res["assembly"].append(bench_assembly(tpd, 8, T, gb, mb, 5 if quick else 20, repeats,
                                                      str(Path(tmp) / f"T{T}")))
                bar.update()
    return res


def format_table(res: dict) -> str:
    """The readable end of a run: the conditions, then one table per benchmark with its baseline ratio."""
    c = res.get("conditions", {})
    out = []
    if c:
        out.append(f"conditions: {c.get('cpu_count')} CPUs, torch {c.get('torch')} ({c.get('torch_threads')} "
                   f"threads), numpy {c.get('numpy')}, python {c.get('python')}; load "
                   f"{', '.join(f'{x:.1f}' for x in c.get('load_average_1_5_15min', []))} (1/5/15 min) at start; "
                   f"median of {res.get('repeats', '?')} repeats; {c.get('date_utc')}")
    body = [[str(r["num_domains"]), f"{r['domain_size']:.0e}", str(r["global_batch_size"]),
             "yes" if r["cached_permutations"] else "no", f"{r['samples_per_s']:,.0f}", fmt(r["us_per_step"], ".0f"),
             fmt(r.get("naive_us_per_step"), ".0f"), fmt(r.get("ratio_vs_naive"), ".2f") + "×"]
            for r in res["index_generation"]]
    out += ["", "index generation (sampler only), against a naive i.i.d. draw of the same batch:",
            md_table(["domains", "domain size", "batch", "cached", "samples/s", "µs/step", "naive µs/step",
                      "× naive"], body)]
    body = [[str(r["num_domains"]), f"{r['domain_size']:.0e}", fmt(r["us_per_set_weights"], ".1f"),
             fmt(r["us_step_steady"], ".1f"), fmt(r["us_step_after_update"], ".1f"),
             fmt(r.get("ratio_after_update_vs_steady"), ".2f") + "×"] for r in res["set_weights"]]
    out += ["", "set_weights (O(domains), independent of domain size), first step after it against a steady step:",
            md_table(["domains", "domain size", "set_weights µs", "steady step µs", "step after update µs",
                      "× steady"], body)]
    body = [[str(r["seq_len"]), str(r["global_batch_size"]), str(r["micro_batch_size"]),
             f"{r['samples_per_s']:,.0f}", f"{r['tokens_per_s']:,.0f}", fmt(r["ms_per_step"], ".2f"),
             fmt(r.get("ratio_vs_index_generation"), ".1f") + "×"] for r in res["assembly"]]
    out += ["", "full batch assembly (MixtureLoader.next_step: indices, memmap reads, tensors), against index "
                "generation alone:",
            md_table(["seq", "batch", "micro", "samples/s", "tokens/s", "ms/step", "× index gen"], body)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loader_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run of a few seconds)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per case; the median is reported")
    ap.add_argument("--out", default=None,
                    help="output folder (default: a new run folder runs/bench/loader-<UTC time>/); the committed "
                         "results are refreshed only when named on purpose: --out benchmarks/results")
    args = ap.parse_args(argv)
    out = Path(args.out or default_out_dir("loader"))
    if out.suffix == ".json":            # a file path, as before: the table goes next to it
        jp, mp = out, out.with_suffix(".md")
    else:
        jp, mp = out / f"{STEM}.json", out / f"{STEM}.md"
    print(f"bench loader: writing to {jp.parent}/", flush=True)
    res = run(quick=args.quick, repeats=args.repeats)
    table = format_table(res)
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(res, indent=1))
    mp.write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"wrote {jp} and {mp.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

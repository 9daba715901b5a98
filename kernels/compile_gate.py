"""Compile gate: compile every launch configuration megamix's launchers can choose, ahead of time, for the GPUs
we support, and check that each fits.

``triton.compile`` takes an explicit target and needs no GPU or driver, so on a CPU machine this compiles each
Triton kernel exactly as its first launch on an A100 (sm_80), H100/H200 (sm_90) or B200 (sm_100) would, and reads

- the shared memory per block (``metadata.shared``): above the GPU's opt-in limit the first launch raises
  ``OutOfResources``, so this is the hard check;
- registers and spills (the ``ptxas -v`` log of the very ptxas call Triton makes to build the cubin): spills
  do not fail, they cost time, and are held to the budget below.

What is compiled, and which configurations are defaults: :mod:`megamix.kernels.compile_jobs`
(:func:`~megamix.kernels.compile_jobs.launch_jobs`): every kernel at every launch configuration its
launcher can choose, k1 sampled per BK1 bucket, the full matrix on sm_90 and the aligned variant (through
proxies with the same shared memory) on sm_80 and sm_100, and the first bucket above each k1 limit.

Budgets held (checked by tests/test_kernels_compile.py, documented in kernels/README.md):

- shared memory <= the target's opt-in limit, for every launch configuration on every target;
- spills: at most :data:`~megamix.kernels.launch_configs.DEFAULT_SPILL_BUDGET` bytes of spill stores per thread
  in the default configurations (no projection; k1 = 32 or 64; k2 16 / 32 / 64; the scale kernel); every other
  spill is reported, and the committed tables pin them (a change fails the test until the tables are rewritten).

Run it (a CPU machine is enough; it uses every core through a process pool and a fresh ``TRITON_CACHE_DIR``)::

    python -m megamix.kernels.compile_gate [--targets 80,90,100] [--json PATH] [--write-results] [--search]

``--write-results`` writes kernels/bench/results/compile_sm{80,90,100}.json and the table in kernels/README.md
(``--markdown`` prints it); ``--search`` re-derives the tables of
:mod:`megamix.kernels.launch_configs` from compiles (see there). Under pytest, ``TRITON_INTERPRET=1`` makes
``@triton.jit`` build interpreter objects that ``triton.compile`` cannot take, so :func:`run_gate` runs the gate
in a subprocess whose environment has no ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

from megamix.kernels import launch_configs as lc
from megamix.kernels.compile_jobs import (_ESIZE, FULL_TARGET, TARGETS, Job, _estimate_ok, _family_jobs,
                                         _search_families, _specialize, is_default, kernel_args, launch_jobs,
                                         spill_budget)

RESULTS_DIR = Path(__file__).resolve().parent / "bench" / "results"


# ----------------------------------------------------------------------------------------------
# Compiling one job (in a worker process)
# ----------------------------------------------------------------------------------------------
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)          # before triton is imported in this process
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"          # Triton prints its own `ptxas -v` log (captured below)


def _ptxas_log(kernel, cap: int) -> str:
    """Fallback when Triton did not print its ptxas log: run ``ptxas -v`` on the PTX with Triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cap)}", str(ptx), "-o", str(Path(d) / "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.stdout + r.stderr


def compile_job(job: Job) -> dict:
    """Compile ``job`` and return its record (see :func:`_record`); a failed compile gives ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    rec = _record(job)
    try:
        fn, args, const_names = kernel_args(job)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            value = args[name]
            if name in const_names:
                signature[name], constexprs[name] = "constexpr", value
                continue
            ty, div16 = _specialize(value)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = value
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        bm, bv, warps, stages = job.config
        options = {"num_warps": warps}
        if stages is not None:                        # the launchers pass num_stages only when it is set
            options["num_stages"] = stages
        buf = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", job.target, 32), options=options)
        rec["compile_s"] = round(time.perf_counter() - t, 2)
        log = buf.getvalue()
        if not _REGS.search(log):
            log = _ptxas_log(k, job.target)
        regs, spills = _REGS.findall(log), _SPILLS.findall(log)
        rec["num_stages"] = int(k.metadata.num_stages)
        rec["shared"] = int(k.metadata.shared)
        rec["registers"] = int(regs[-1]) if regs else None
        if spills:
            rec["stack"], rec["spill_stores"], rec["spill_loads"] = (int(x) for x in spills[-1])
        rec["fits"] = rec["shared"] <= rec["shared_limit"]
    except Exception as e:  # report, never hide: a target the pinned Triton cannot build for shows up here
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return rec


def _record(job: Job) -> dict:
    return {"kernel": job.kernel, "target": f"sm_{job.target}", "cap": job.target, "gpu": TARGETS.get(job.target, "?"),
            "dtype": job.dtype, "has_proj": job.has_proj, "k1": job.k1 if (job.has_proj or job.bk2) else None,
            "bk1": job.bk1 if (job.has_proj or job.bk2) else None, "k2": job.k2, "bk2": job.bk2,
            "has_order": job.has_order if job.kernel == "_segment_outer_kernel" else None,
            "variant": job.variant, "role": job.role, "config": list(job.config),
            "block_m": job.config[0], "block_v": job.config[1], "num_warps": job.config[2],
            "num_stages": job.config[3], "shared": None, "shared_limit": lc.SHARED_MEMORY_LIMITS[job.target],
            "registers": None, "stack": None, "spill_stores": None, "spill_loads": None, "fits": None,
            "compile_s": None, "error": None}


def run_jobs(jobs: list[Job], workers: int | None = None, progress=None) -> list[dict]:
    """Compile ``jobs`` in a pool of ``workers`` processes (default: every CPU) with a fresh Triton cache."""
    import multiprocessing as mp
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    cache = tempfile.mkdtemp(prefix="megamix-compile-gate-")
    # the slowest first (fp32, large tiles), so that the pool does not wait on one long compile at the end
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    out: list[dict | None] = [None] * len(jobs)
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(cache,)) as ex:
            futs = {ex.submit(compile_job, jobs[i]): i for i in order}
            for n, f in enumerate(as_completed(futs)):
                out[futs[f]] = f.result()
                if progress:
                    progress(n + 1, len(jobs), out[futs[f]])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out  # type: ignore[return-value]


def _cost(job: Job) -> float:
    e = _ESIZE.get(job.dtype, 4)
    return (job.bk1 or 16) * (job.bk2 or 16) * e * (job.config[0] or 1)


def problems(records: list[dict]) -> list[str]:
    """What the gate fails on: compile errors, launch configurations over the shared-memory limit, default
    configurations spilling more than DEFAULT_SPILL_BUDGET, and a 'refused' configuration that fits the A100 after
    all. (Other spills are reported, and pinned by the committed tables: see tests/test_kernels_compile.py.)"""
    out = []
    for r in records:
        tag = describe(r)
        if r["error"]:
            out.append(f"{tag}: did not compile for {r['target']} ({r['gpu']}): {r['error']}")
            continue
        if r["role"] == "refused":
            if r["cap"] == 80 and r["fits"]:
                out.append(f"{tag}: the first k1 above max_k1 fits the A100 ({kb(r['shared'])}): raise the limit")
            continue
        if r["role"] != "launch":
            continue
        if not r["fits"]:
            out.append(f"{tag}: needs {kb(r['shared'])} of shared memory per block, above the {r['gpu']}'s "
                       f"{kb(r['shared_limit'])}")
        if is_default(r) and (r["spill_stores"] or 0) > lc.DEFAULT_SPILL_BUDGET:
            out.append(f"{tag}: a default configuration spills {r['spill_stores']} bytes of registers per thread, "
                       f"above the budget of {lc.DEFAULT_SPILL_BUDGET}")
    return out


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def kb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n / 1024:.1f}".rstrip("0").rstrip(".") + " KB"


def describe(r: dict) -> str:
    what = r["kernel"]
    if r["kernel"] == "_segment_outer_kernel":
        what += f" k1={r['k1']} k2={r['k2']} order={r['has_order']}"
    else:
        what += f" {r['dtype']} " + (f"k1={r['k1']}" if r["has_proj"] else "no projection")
    c = r["config"]
    return f"{what} [{r['variant']}] {c[0]}x{c[1]} w{c[2]} s{c[3] if c[3] is not None else 'default'} {r['target']}"


def _sort_key(r: dict):
    return (r["kernel"], r["role"], r["dtype"], r["bk1"] or 0, r["bk2"] or 0, bool(r["has_order"]), r["has_proj"],
            r["variant"], r["cap"])


def format_table(records: list[dict]) -> str:
    head = (f"{'kernel':<23} {'role':<7} {'tgt':<6} {'dtype':<5} {'k1':>5} {'k2':>4} {'var':<5} {'BMxBV':>7} "
            f"{'w':>2} {'s':>2} {'shared':>8} {'limit':>7} {'regs':>4} {'spill st/ld':>11} {'fits':<4} {'s':>5}")
    lines = [head, "-" * len(head)]
    for r in sorted(records, key=_sort_key):
        k1 = "-" if r["k1"] is None else str(r["k1"])
        k2 = "-" if r["k2"] is None else str(r["k2"])
        if r["kernel"] == "_segment_outer_kernel" and not r["has_order"]:
            k2 += "*"
        sp = "-" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        fits = "ERR" if r["error"] else ("yes" if r["fits"] else "NO")
        lines.append(f"{r['kernel']:<23.23} {r['role']:<7} {r['target']:<6} {r['dtype']:<5} {k1:>5} {k2:>4} "
                     f"{r['variant'][:5]:<5} {r['block_m']:>3}x{r['block_v']:<3} {r['num_warps']:>2} "
                     f"{str(r['num_stages'] or '-'):>2} "
                     f"{kb(r['shared']):>8} {kb(r['shared_limit']):>7} {str(r['registers'] or '-'):>4} {sp:>11} "
                     f"{fits:<4} {r['compile_s'] if r['compile_s'] is not None else '-':>5}")
    lines.append("(k2 marked * : _segment_outer_kernel without a row order; 'unali' = the unaligned variant)")
    return "\n".join(lines)


def triton_version() -> str:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:  # pragma: no cover
        return "unknown"


def write_results(records: list[dict], meta: dict, out_dir: Path = RESULTS_DIR) -> list[Path]:
    """The committed tables: one JSON per target with the Triton version, the date and the records."""
    paths = []
    for cap in sorted({r["cap"] for r in records}):
        p = out_dir / f"compile_sm{cap}.json"
        recs = sorted((r for r in records if r["cap"] == cap), key=_sort_key)
        head = {"target": f"sm_{cap}", "gpu": TARGETS.get(cap), "shared_limit": lc.SHARED_MEMORY_LIMITS[cap], **meta}
        # one record per line: the tables diff line by line when a configuration or Triton changes
        p.write_text(json.dumps(head, indent=1)[:-2] + ',\n "records": [\n'
                     + ",\n".join("  " + json.dumps(r) for r in recs) + "\n ]\n}\n")
        paths.append(p)
    return paths


def load_results(out_dir: Path = RESULTS_DIR) -> dict:
    """The committed tables, {capability: document}."""
    return {cap: json.loads((out_dir / f"compile_sm{cap}.json").read_text()) for cap in TARGETS
            if (out_dir / f"compile_sm{cap}.json").exists()}


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["error"]:
        return "error"
    out = f"**{kb(r['shared'])} (over)**" if not r["fits"] else kb(r["shared"])
    out += f", {r['registers']} regs"
    if r["spill_stores"]:
        out += f", {r['spill_stores']} B spill"
    return out


def markdown_table(results: dict) -> str:
    """Markdown summary of the committed tables: the default configurations and the boundary buckets (shared
    memory, registers, spill stores per thread; the unaligned column is sm_90 at the bucket's smallest k1)."""
    recs = [r for doc in results.values() for r in doc["records"]]
    by = {}
    for r in recs:
        by[(r["kernel"], r["role"], r["dtype"], r["bk1"], r["bk2"], r["has_order"], r["variant"], r["cap"])] = r
    caps = sorted(results)
    head = ("| kernel | logits | k1 | k2 | tile (BM×BV, warps, stages) | "
            + " | ".join(f"sm_{c} ({TARGETS[c]})" for c in caps) + " | sm_90, smallest k1 of the bucket |")
    lines = [head, "|" + "---|" * (6 + len(caps))]

    def row(kernel, dt, bk1, bk2=None, order=None, role="launch", label=None):
        cells = [by.get((kernel, role, dt, bk1, bk2, order, "aligned", c)) for c in caps]
        una = by.get((kernel, role, dt, bk1, bk2, order, "unaligned", 90))
        some = next((c for c in cells if c), None)
        if some is None:
            return
        c = some["config"]
        tile = f"{c[0]}×{c[1]}, {c[2]}, {c[3] if c[3] is not None else 'default (3)'}"
        k1 = label or ("-" if bk1 is None else str(bk1))
        if una is not None and bk1 is not None:
            k1u = f"k1={una['k1']}" + (f", k2={una['k2']}" if bk2 else "") + ": " + _cell(una)
        else:
            k1u = _cell(una) if una is not None else "-"
        name = f"`{kernel}`" + (" (refused)" if role == "refused" else "")
        lines.append(f"| {name} | {dt} | {k1} | {bk2 if bk2 else '-'} | {tile} | "
                     + " | ".join(_cell(x) for x in cells) + f" | {k1u} |")

    maxk, wide = {}, {}
    for r in recs:
        if r["role"] == "launch" and r["has_proj"] and r["kernel"] == "_ce_delta_proj_kernel":
            maxk[r["dtype"]] = max(maxk.get(r["dtype"], 0), r["bk1"])
            if r["config"][1] == 256:
                wide[r["dtype"]] = max(wide.get(r["dtype"], 0), r["bk1"])
    shown_dtypes = ("bf16", "fp32")      # fp16 needs what bf16 needs (the test checks it on sm_90)
    for dt in shown_dtypes:
        row("_ce_delta_proj_kernel", dt, None, label="none")
        for bk1 in sorted({*lc.DEFAULT_K1, wide.get(dt, 16), maxk.get(dt, 16)}):
            row("_ce_delta_proj_kernel", dt, bk1)
    for kernel in ("_ce_shard_delta_kernel", "_proj_u_kernel"):
        for dt in shown_dtypes:
            for bk1 in (max(lc.DEFAULT_K1), maxk.get(dt, 16)):
                row(kernel, dt, bk1)
    for dt in shown_dtypes:
        row("_ce_shard_stats_kernel", dt, None, label="none")
    row("_scale_kernel", "bf16", None, label="-")
    pairs = sorted({(r["bk1"], r["bk2"]) for r in recs if r["kernel"] == "_segment_outer_kernel"})
    if pairs:
        pmax = max(a * b for a, b in pairs)
        for b1, b2 in [(64, 32)] + [p for p in pairs if p[0] * p[1] == pmax]:
            row("_segment_outer_kernel", "fp32", b1, b2, order=False)
    for r in sorted((r for r in recs if r["role"] == "refused" and r["cap"] == caps[0]
                     and r["dtype"] in shown_dtypes), key=lambda r: (r["kernel"], r["dtype"])):
        row(r["kernel"], r["dtype"], r["bk1"], role="refused")
    return "\n".join(lines)


README = Path(__file__).resolve().parent / "README.md"
_MARKS = ("<!-- compile-table:start -->\n", "\n<!-- compile-table:end -->")


def write_readme_table(path: Path = README) -> bool:
    """Replace the table between kernels/README.md's compile-table markers with :func:`markdown_table` of the
    committed results."""
    if not path.exists():
        return False
    text = path.read_text()
    a, b = text.find(_MARKS[0]), text.find(_MARKS[1])
    if a < 0 or b < 0:
        return False
    path.write_text(text[:a + len(_MARKS[0])] + markdown_table(load_results()) + text[b:])
    return True


def run_gate(targets=tuple(TARGETS), *, timeout: float = 900, extra_args: tuple = ()) -> dict:
    """Run the gate in a fresh Python process without ``TRITON_INTERPRET`` (safe to call from the test suite) and
    return its JSON document: ``{"triton", "date", "wall_s", "workers", "problems", "records"}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "gate.json"
        cmd = [sys.executable, "-m", "megamix.kernels.compile_gate", "--quiet", "--json", str(out),
               "--targets", ",".join(str(t) for t in targets), *extra_args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"the compile gate did not finish (exit {r.returncode}):\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
# --search: re-derive the tables of launch_configs from compiles
# ----------------------------------------------------------------------------------------------
def _max_spill(rs) -> int:
    return max((r["spill_stores"] or 0) for r in rs)


def _within_budget(rs) -> bool:
    return all((r["spill_stores"] or 0) <= spill_budget(r) for r in rs)


def _decide(kind: str, tried: list, n_candidates: int):
    """The policy (see launch_configs), on the candidates tried so far (in order: (config, fits, records)).
    Returns ("take", config) | ("dead", None) | ("more", None) (try the next candidate)."""
    fitting = [(c, rs) for c, ok, rs in tried if ok]
    done = len(tried) >= n_candidates
    if kind == "ce":
        # the widest vocab tile that fits at some stage count; among its stage counts, the first within the spill
        # budget, else the least spilling. A narrower tile only when the wider one fits at no stage count.
        if not fitting:
            return ("dead", None) if done else ("more", None)
        bv = fitting[0][0].block_v
        same = [(c, ok, rs) for c, ok, rs in tried if c.block_v == bv]
        if not done and tried[-1][0].block_v == bv:     # stage counts of this BV not all tried yet
            return "more", None
        ok = [(c, rs) for c, fits, rs in same if fits]
        good = [c for c, rs in ok if _within_budget(rs)]
        return "take", (good[0] if good else min(ok, key=lambda x: _max_spill(x[1]))[0])
    good = [c for c, rs in fitting if _within_budget(rs)]
    if good:
        return "take", good[0]
    if not done:
        return "more", None
    if not fitting:
        return "dead", None
    return "take", min(fitting, key=lambda x: _max_spill(x[1]))[0]


def search(targets=tuple(TARGETS), full_target=FULL_TARGET, workers=None, log=print, cache_path=None) -> dict:
    """Walk each family's candidates (kernels sharing one configuration, per dtype and bucket) in order of
    preference and apply :func:`_decide`. Buckets above one with no fitting candidate are not supported. Returns
    {family: {"config", "shared", "spill", "registers"}} and {("refused", kind, dtype): first unsupported bucket}."""
    fams = _search_families()
    cache = {}
    if cache_path and Path(cache_path).exists():
        cache = {json.dumps(r["job"]): r for r in map(json.loads, Path(cache_path).read_text().splitlines())}
    cands = {f: [c for c in fams[f][1] if _estimate_ok(f, c)] for f in fams}
    tried = {f: [] for f in fams}
    chosen: dict = {}
    dead: dict = {}                           # (kind, dtype) -> smallest bucket with no fitting candidate
    big = 1 << 30
    while True:
        for f in fams:     # no candidate left (or none worth compiling) and nothing taken: not supported
            if f not in chosen and len(tried[f]) >= len(cands[f]) and not any(ok for _, ok, _ in tried[f]):
                dead[(f[0], f[1])] = min(f[2], dead.get((f[0], f[1]), big))
        todo = [f for f in fams if f not in chosen and f[2] < dead.get((f[0], f[1]), big)
                and len(tried[f]) < len(cands[f])]
        if not todo:
            break
        jobs = {f: _family_jobs(f, fams[f][0], cands[f][len(tried[f])], targets, full_target) for f in todo}
        flat = [j for js in jobs.values() for j in js]
        new = [j for j in flat if json.dumps(asdict(j)) not in cache]
        log(f"search round: {len(todo)} buckets, {len(new)} compiles ({len(flat) - len(new)} cached)")
        for j, r in zip(new, run_jobs(new, workers) if new else []):
            r["job"] = asdict(j)
            cache[json.dumps(asdict(j))] = r
            if cache_path:
                with open(cache_path, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
        for f in todo:
            cfg = cands[f][len(tried[f])]
            rs = [cache[json.dumps(asdict(j))] for j in jobs[f]]
            fits = all(r["fits"] and not r["error"] for r in rs)
            tried[f].append((cfg, fits, rs))
            log(f"  {f} {tuple(cfg)}: fits={fits} shared={max((r['shared'] or 0) for r in rs)} "
                f"spill={_max_spill(rs)} regs={max((r['registers'] or 0) for r in rs)}")
            what, c = _decide(f[0], tried[f], len(cands[f]))
            if what == "take":
                rs = next(r for cc, _, r in tried[f] if cc == c)
                chosen[f] = {"config": tuple(c), "shared": max(r["shared"] for r in rs), "spill": _max_spill(rs),
                             "registers": max((r["registers"] or 0) for r in rs)}
            elif what == "dead":
                dead[(f[0], f[1])] = min(f[2], dead.get((f[0], f[1]), big))
    out = {f: v for f, v in chosen.items() if f[2] < dead.get((f[0], f[1]), big)}
    for (kind, dt), b in dead.items():
        out[("refused", kind, dt)] = b
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megamix.kernels.compile_gate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="80,90,100", help="compute capabilities (default 80,90,100)")
    ap.add_argument("--json", help="write the records (and timings, problems) to this file")
    ap.add_argument("--write-results", action="store_true",
                    help="write the committed tables kernels/bench/results/compile_sm{80,90,100}.json")
    ap.add_argument("--markdown", action="store_true", help="print the summary table of the committed results")
    ap.add_argument("--search", action="store_true", help="re-derive launch_configs' tables (slow: minutes)")
    ap.add_argument("--cache", help="--search: reuse / append compile records in this JSON-lines file")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: every CPU)")
    ap.add_argument("--quiet", action="store_true", help="no table, only the summary")
    a = ap.parse_args(argv)
    targets = tuple(int(t) for t in a.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in lc.SHARED_MEMORY_LIMITS]
    if unknown:
        ap.error(f"no shared-memory limit known for sm_{unknown[0]} (known: {sorted(lc.SHARED_MEMORY_LIMITS)})")
    full = FULL_TARGET if FULL_TARGET in targets else targets[0]
    if a.markdown:
        print(markdown_table(load_results()))
        return 0
    if a.search:
        res = search(targets, full, a.workers, cache_path=a.cache)
        for f in sorted(res, key=lambda f: tuple(str(x) for x in f)):
            print(f, res[f])
        return 0
    jobs = launch_jobs(targets, full)
    t0 = time.perf_counter()
    records = run_jobs(jobs, a.workers)
    wall = time.perf_counter() - t0
    probs = problems(records)
    meta = {"triton": triton_version(), "date": _dt.date.today().isoformat(), "wall_s": round(wall, 1),
            "workers": a.workers or os.cpu_count(),
            "compile_s_total": round(sum(r["compile_s"] or 0 for r in records), 1)}
    if not a.quiet:
        print(format_table(records))
    spills = [r for r in records if (r["spill_stores"] or 0) > 0 and r["role"] == "launch"]
    print(f"\n{len(records)} compiles for {', '.join(f'sm_{t}' for t in targets)} in {wall:.1f} s wall "
          f"({meta['compile_s_total']} s of compiling on {meta['workers']} processes), triton {meta['triton']}")
    for r in spills:
        print(f"spills: {describe(r)}: {r['spill_stores']} B stores / {r['spill_loads']} B loads per thread")
    for p in probs:
        print(f"PROBLEM: {p}")
    if not probs:
        print("every launch configuration fits every target; spills within budget")
    if a.json:
        Path(a.json).write_text(json.dumps({**meta, "problems": probs, "records": records}, indent=1) + "\n")
    if a.write_results:
        for p in write_results(records, meta):
            print(f"wrote {p}")
        if write_readme_table():
            print(f"wrote the table in {README}")
    return 1 if probs else 0


if __name__ == "__main__":
    sys.exit(main())

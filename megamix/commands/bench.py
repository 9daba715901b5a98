"""`megamix bench kernels|gram|loader`: the benchmarks, in their two homes.

- ``kernels`` and ``gram`` are the kernel microbenchmarks of ``kernels/bench/`` (installed as
  :mod:`megamix.kernels.bench`; same options as ``bench_fused_lce.py`` / ``bench_domain_gram.py``);
- ``loader`` runs ``benchmarks/loader_bench.py`` of the source checkout (the one copy of that benchmark).

Every target writes to ``--out DIR``, by default a new run folder ``runs/bench/<target>-<UTC time>/``, and ends
with a readable table; the committed results (``kernels/bench/results/``, ``benchmarks/results/``) are refreshed
only when named on purpose. Examples::

    megamix bench kernels --cpu                                   # CPU torch path + projection ratio
    megamix bench kernels --cpu --quick --out /tmp/k              # the smallest setting (a few seconds)
    megamix bench kernels --V 128256 --d 4096 --N 16384 --k 64x64  # on a GPU machine
    megamix bench kernels --shapes 128256:4096:16384 --k 64x64 --u-methods fused,gemm,augmented,tiled \
        --chunks 4096,8192,16384                                  # where u is computed, vs the 3-GEMM floor
    megamix bench kernels --cpu --out kernels/bench/results       # refresh the committed CPU results
    megamix bench gram --cpu                                      # per-sample reduction vs bmm
    megamix bench loader --quick                                  # loader throughput
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

OUT_RULE = ("Results go to --out DIR (default: a new run folder runs/bench/<target>-<UTC time>/) and the run ends "
            "with a table; the committed results are refreshed only when named on purpose.")


def register(sub) -> None:
    p = sub.add_parser("bench", help="Benchmarks (kernel microbenchmarks, the loader).", description=OUT_RULE)
    bsub = p.add_subparsers(dest="bench_target", metavar="TARGET")
    from megamix.kernels.bench.args import build_domain_gram_parser, build_parser
    k = bsub.add_parser("kernels", help="Fused linear cross-entropy with gradient projection vs baselines.",
                        description="kernels/bench/bench_fused_lce.py: every method's full LM-head step as a "
                                    "ratio to the step's three-GEMM floor. " + OUT_RULE)
    build_parser(k)
    k.set_defaults(func=run)
    gr = bsub.add_parser("gram", help="Per-sample reduction (g_i = Σ_t u_t w_tᵀ) vs a plain bmm.",
                         description="kernels/bench/bench_domain_gram.py. " + OUT_RULE)
    build_domain_gram_parser(gr)
    gr.set_defaults(func=run_gram)
    lo = bsub.add_parser("loader", help="Weighted loader: index generation, batch assembly, weight-update cost.",
                         description="benchmarks/loader_bench.py of the source checkout: the median of several "
                                     "repeats, each against a baseline of the same run. " + OUT_RULE)
    # the options of benchmarks/loader_bench.py, declared here so `--help` works without loading the script
    lo.add_argument("--quick", action="store_true", help="Small sizes (a smoke run of a few seconds).")
    lo.add_argument("--repeats", type=int, default=None, help="Repeats per case; the median is reported (default 5).")
    lo.add_argument("--out", default=None, help="Output folder (default: a new run folder runs/bench/loader-<UTC "
                                                "time>/); --out benchmarks/results refreshes the committed JSON.")
    lo.set_defaults(func=run_loader)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run(args) -> int:
    from megamix.kernels.bench.bench_fused_lce import main
    return main(args)


def gram_table(res: dict) -> str:
    """Conditions and one row per (shape, method) of a ``bench_domain_gram`` JSON: ms, ratio to the group's
    baseline, peak memory, error against the baseline's result."""
    from megamix.kernels.bench.output import conditions_line, fmt, md_table

    meta = res.get("meta", {})
    mem = "peak MB" if str(meta.get("device", "")).startswith("cuda") else "peak RSS +MB"
    body = []
    for r in res.get("rows", []):
        shape = [fmt(r.get("N"), "d"), fmt(r.get("T"), "d"), f"{r.get('k1')}x{r.get('k2')}", fmt(r.get("D"), "d")]
        if r.get("error"):
            body.append(shape + [str(r.get("method")), "error: " + str(r["error"])[:60], "", "", ""])
            continue
        ratio = r.get("ratio_vs_baseline")
        body.append(shape + [str(r.get("method")), fmt(r.get("ms"), ".3f"),
                             fmt(ratio, ".2f") + ("" if ratio is None else "×"), fmt(r.get("peak_mb"), ".1f"),
                             fmt(r.get("max_rel_err"), ".1e")])
    return "\n".join([conditions_line(meta), "",
                      "median ms; ratio to the first (baseline) method of its group, same shape, same run",
                      md_table(["N", "T", "k", "D", "method", "ms", "× baseline", mem, "max rel err"], body,
                               right={0, 1, 2, 3, 5, 6, 7, 8})])


def run_gram(args) -> int:
    from megamix.kernels.bench.bench_domain_gram import main
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench gram: writing to {out}/", flush=True)
    log = out / "bench_domain_gram.log"
    t0 = time.time()
    with log.open("w") as f, contextlib.redirect_stdout(f):   # per-row JSON lines go to the log, not the terminal
        rc = main(args)
    if rc:
        print(log.read_text()[-3000:])
        return rc
    results = [p for p in out.glob("*.json") if p.stat().st_mtime >= t0 - 1]
    if not results:
        print(log.read_text()[-3000:])
        return rc
    jp = max(results, key=lambda p: p.stat().st_mtime)
    table = gram_table(json.loads(jp.read_text()))
    (out / f"{jp.stem}.md").write_text(table + "\n")
    print("\n" + table + "\n")
    print(f"wrote {jp}, {jp.stem}.csv, {jp.stem}.md and {log.name}")
    return 0


def loader_script() -> Path:
    """``benchmarks/loader_bench.py`` of the checkout this megamix was installed from (editable install)."""
    import megamix
    return Path(megamix.__file__).resolve().parents[1] / "benchmarks" / "loader_bench.py"


def run_loader(args) -> int:
    import importlib.util

    from megamix.cli import fail

    path = loader_script()
    if not path.is_file():
        return fail(f"megamix bench loader runs {path}, which this installation does not have: run it from a "
                    "source checkout installed with `pip install -e .` (or `make setup`)")
    spec = importlib.util.spec_from_file_location("megamix_benchmarks_loader_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--quick"] if args.quick else []
    if args.repeats is not None:
        argv += ["--repeats", str(args.repeats)]
    if args.out is not None:
        argv += ["--out", args.out]
    return mod.main(argv)

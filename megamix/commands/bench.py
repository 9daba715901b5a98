"""`megamix bench kernels|gram|loader`: the microbenchmarks.

Thin wrappers over :mod:`megamix.kernels.bench.bench_fused_lce` and
:mod:`megamix.kernels.bench.bench_domain_gram` (same options). Examples::

    megamix bench kernels --cpu                                   # CPU torch path + projection ratio
    megamix bench kernels --V 128256 --d 4096 --N 16384 --k 64x64  # on a GPU machine
    megamix bench kernels --shapes 128256:4096:16384 --k 64x64 --u-methods fused,gemm,augmented,tiled \
        --chunks 4096,8192,16384                                  # where u is computed, vs the 3-GEMM floor
    megamix bench gram --cpu                                      # per-sample reduction + domain Gram
    megamix bench loader --quick                                  # loader throughput
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="Microbenchmarks (kernels, loader).")
    bsub = p.add_subparsers(dest="bench_target", metavar="TARGET")
    from megamix.kernels.bench.args import build_domain_gram_parser, build_parser
    k = bsub.add_parser("kernels", help="Fused linear cross-entropy with gradient projection vs baselines.")
    build_parser(k)
    k.set_defaults(func=run)
    gr = bsub.add_parser("gram", help="Per-sample reduction and per-domain sums / Gram vs baselines.")
    build_domain_gram_parser(gr)
    gr.set_defaults(func=run_gram)
    lo = bsub.add_parser("loader", help="Weighted loader: index generation, batch assembly, weight-update cost.",
                         description="megamix.loader.bench (also benchmarks/loader_bench.py): prints a table and "
                                     "writes JSON with the median of several repeats.")
    # the options of megamix.loader.bench.main, declared here so `--help` works without importing the loader
    lo.add_argument("--quick", action="store_true", help="Small sizes (a smoke run of a few seconds).")
    lo.add_argument("--repeats", type=int, default=None, help="Repeats per case; the median is reported (default 5).")
    lo.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/loader_bench.json).")
    lo.set_defaults(func=run_loader)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run(args) -> int:
    from megamix.kernels.bench.bench_fused_lce import main
    return main(args)


def run_gram(args) -> int:
    from megamix.kernels.bench.bench_domain_gram import main
    return main(args)


def run_loader(args) -> int:
    from megamix.loader.bench import main
    argv = ["--quick"] if args.quick else []
    if args.repeats is not None:
        argv += ["--repeats", str(args.repeats)]
    if args.out is not None:
        argv += ["--out", args.out]
    return main(argv)

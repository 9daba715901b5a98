"""`megamix bench kernels`: run the fused linear-CE / projection microbenchmark.

A thin wrapper over :mod:`kernels.bench.bench_fused_lce` (same options). Examples::

    megamix bench kernels --cpu                                   # CPU torch path + projection ratio
    megamix bench kernels --V 128256 --d 4096 --N 16384 --k 64x64  # on a GPU machine
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="Microbenchmarks (kernels).")
    bsub = p.add_subparsers(dest="bench_target", metavar="TARGET")
    from kernels.bench.args import build_parser
    k = bsub.add_parser("kernels", help="Fused linear cross-entropy with gradient projection vs baselines.")
    build_parser(k)
    k.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run(args) -> int:
    from kernels.bench.bench_fused_lce import main
    return main(args)

"""Command-line options of the kernel microbenchmark (kept free of torch imports so that
``megamix --help`` stays fast)."""
from __future__ import annotations

import argparse

from megamix.kernels.bench.output import default_out_dir


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _ks(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split("x")) for x in s.split(",") if x]


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description="Fused linear-CE + gradient projection microbenchmark.")
    p.add_argument("--cpu", action="store_true", help="CPU mode: torch path at small shapes + projection ratio")
    p.add_argument("--quick", action="store_true",
                   help="smallest setting (a few seconds on CPU): one tiny shape, k 16x16, 5 timed calls; "
                        "options given explicitly still apply")
    p.add_argument("--V", type=_ints, default=None, help="vocab sizes, comma separated")
    p.add_argument("--d", type=_ints, default=None, help="hidden sizes")
    p.add_argument("--N", type=_ints, default=None, help="token counts")
    p.add_argument("--shapes", default=None,
                   help="explicit V:d:N list, e.g. 128256:4096:16384,32000:768:16384 (overrides --V/--d/--N)")
    p.add_argument("--k", type=_ks, default=None, help="k1xk2 list, e.g. 32x32,64x64,128x64")
    p.add_argument("--methods", default="floor,fused+proj,fused,eager+proj,liger,cce",
                   help="floor = the three GEMMs alone (same chunking); fused+proj, fused, eager+proj, liger, cce")
    p.add_argument("--u-methods", default="fused",
                   help="where fused+proj computes u = δ P1ᵀ: comma list of fused,gemm,augmented,tiled "
                        "(tiled: Triton only)")
    p.add_argument("--chunks", type=_ints, default=None,
                   help="chunk_tokens sweep for floor/fused/fused+proj, e.g. 4096,8192,16384 (default: --chunk)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--chunk", type=int, default=8192, help="chunk_tokens of the fused kernel")
    p.add_argument("--backend", default="auto")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, --quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls; the median is reported (default 7, --quick 5)")
    p.add_argument("--time-budget", type=float, default=1e9, help="stop starting new shapes after this many s")
    p.add_argument("--sweep-ce", action="store_true", help="also time the CE pass alone for several tile configs")
    p.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                   help="output folder (default: a new run folder runs/bench/kernels-<UTC time>/); the committed "
                        "results are refreshed only when named on purpose: --out kernels/bench/results")
    p.add_argument("--tag", default=None, help="output file stem (default: bench_<gpu|cpu>)")
    p.add_argument("--_cpu-case", dest="cpu_case", default=None, help=argparse.SUPPRESS)
    return p


def build_domain_gram_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of ``kernels/bench/bench_domain_gram.py`` (``megamix bench gram``)."""
    p = p or argparse.ArgumentParser(description="Per-sample reduction microbenchmark.")
    p.add_argument("--cpu", action="store_true", help="CPU mode (torch backend only) even when CUDA is present")
    p.add_argument("--shapes", default=None, help="N:T list, e.g. 16384:2048,16384:256 (T = tokens per sample)")
    p.add_argument("--k", type=_ks, default=None, help="k1xk2 list, e.g. 32x32,64x64,128x64")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", "--out-dir", dest="out_dir", default=default_out_dir("gram"),
                   help="output folder (default: a new run folder runs/bench/gram-<UTC time>/); the committed "
                        "results are refreshed only when named on purpose: --out kernels/bench/results")
    p.add_argument("--tag", default=None, help="output file stem (default: bench_domain_gram_<gpu|cpu>)")
    return p

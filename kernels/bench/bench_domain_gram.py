"""Microbenchmark of the segmented per-sample reduction :func:`per_sample_grads` (``kernels/domain_gram.py``), with
the same conventions as ``bench_fused_lce.py``.

For each (N tokens, T tokens per sample, k1×k2) it times, in the same run and on the same ``u [N, k1]``,
``w [N, k2]`` (fp32, as the fused loss emits them):

- ``per_sample[bmm]`` (baseline): one batched GEMM ``U_iᵀ W_i`` per sample (equal-length samples only; what
  training runs, ``per_sample_grads(..., tokens_per_sample=T)``),
- ``per_sample[triton]`` / ``per_sample[torch]``: :func:`per_sample_grads` with a per-token sample index, on each
  backend,

and reports the median ms, the ratio to the baseline, and the run's conditions (device, versions, load). On CPU
only the torch backend is timed (the Triton interpreter is a correctness tool, not a timing); results are written
as JSON + CSV (``bench_domain_gram_<gpu|cpu>``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from megamix.kernels.bench.args import build_domain_gram_parser as build_parser
from megamix.kernels.bench.common import env_info, peak_mb, time_ms, write_json_csv
from megamix.kernels.domain_gram import per_sample_grads
from megamix.kernels.utils import HAS_TRITON

KEYS = ["N", "T", "B", "k1", "k2", "method", "ms", "ratio_vs_baseline", "peak_mb", "max_rel_err", "error"]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def bench_case(N: int, T: int, k1: int, k2: int, dev: torch.device, backends: list[str], warmup: int, iters: int,
               seed: int = 0) -> list[dict]:
    """All methods on one shape; each row carries its error against the baseline's result."""
    if N % T:
        raise ValueError(f"N={N} must be a multiple of T={T} (equal-length samples for the bmm baseline)")
    B = N // T
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(N, k1, generator=g) * 1e-3).to(dev)
    w = torch.randn(N, k2, generator=g).to(dev)
    sample_index = torch.arange(B, device=dev).repeat_interleave(T)

    def bmm():
        return torch.bmm(u.view(B, T, k1).transpose(1, 2), w.view(B, T, k2)).reshape(B, k1 * k2)

    methods = [("per_sample[bmm]", bmm)] + [
        (f"per_sample[{be}]", lambda be=be: per_sample_grads(u, w, sample_index, B, backend=be)) for be in backends]
    rows = []
    base_ms = base_out = None
    for name, fn in methods:
        row = {"N": N, "T": T, "B": B, "k1": k1, "k2": k2, "method": name}
        try:
            out = fn()
            ms = statistics.median(time_ms(fn, dev, warmup, iters))
            if base_out is None:
                base_ms, base_out = ms, out
            row.update(ms=ms, ratio_vs_baseline=ms / base_ms, peak_mb=peak_mb(fn, dev),
                       max_rel_err=_rel_err(out, base_out), error=None)
        except Exception as e:  # reported, not fatal
            row.update(ms=None, ratio_vs_baseline=None, peak_mb=None, max_rel_err=None,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    backends = ["triton", "torch"] if (cuda and HAS_TRITON) else ["torch"]
    if cuda:
        shapes, ks = "16384:2048,16384:256", args.k or [(32, 32), (64, 64), (128, 64)]
    else:
        shapes, ks = "2048:128,2048:512", args.k or [(32, 32), (64, 64)]
    shapes = [tuple(int(x) for x in sh.split(":")) for sh in (args.shapes or shapes).split(",") if sh]
    meta = env_info(dev)
    meta.update(backends=backends, warmup=args.warmup, iters=args.iters, dtype="float32")
    tag = args.tag or f"bench_domain_gram_{'gpu' if cuda else 'cpu'}"
    from tqdm import tqdm
    rows: list[dict] = []
    cases = [(N, T, k1, k2) for N, T in shapes for k1, k2 in ks]
    for N, T, k1, k2 in tqdm(cases, desc="bench per_sample_grads", file=sys.stderr):
        rows += bench_case(N, T, k1, k2, dev, backends, args.warmup, args.iters)
        jp, cp = write_json_csv(Path(args.out_dir), tag, meta, rows, {}, KEYS)
    print(f"wrote {jp} and {cp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))

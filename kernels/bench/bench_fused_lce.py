"""Microbenchmark of the fused linear cross-entropy with factored gradient projection.

GPU mode (default when CUDA is present): for each (V, d, N) and k1×k2 it times, in the same run,
- ``floor``: the step's three GEMMs alone (logits ``x Wᵀ``, dX ``δ W``, dW ``δᵀ x``) with the same chunking
  and padding as the fused step and no CE pass: the physical floor the fused step is compared with,
- ``fused+proj k1xk2`` (``fused+proj[<u_method>] k1xk2`` for the non-default ``--u-methods``): megamix fused
  LCE emitting u, w (+ the segmented per-sample reduction),
- ``fused``: the same kernel with projection off,
- ``eager+proj``: full logits + F.cross_entropy + autograd + a separate projection of dlogits,
- ``liger`` / ``cce``: Liger-Kernel's fused linear CE and Apple's cut-cross-entropy, when importable,
for ``forward`` (gradient-in-forward kernels do their GEMMs here), ``backward`` and ``full``
(forward+backward), and reports median ms, TFLOP/s (6NVd per full step), peak extra memory, the
projection overhead against ``fused`` at the same chunk size, and every full step as a ratio to the floor
(same chunk size, and the best floor over the chunk sizes of ``--chunks``).

CPU mode (``--cpu``): the torch path at small shapes, plus the ratio of the factored projection
(u = P1 δ, w = P2 a, g_i = Σ u wᵀ) against materialise-then-project (G_i = Σ δ aᵀ, then P1 G_i P2ᵀ)
at V=8k, d=512, B=16, T=128 (time, and peak memory measured in fresh subprocesses).

``--quick`` is the smallest setting (one tiny shape, k 16x16, 5 timed calls, the projection ratio at a small
shape in this process; a few seconds on CPU).

Output: ``<out>/<tag>.json`` (conditions, rows, extras), ``<tag>.csv`` and ``<tag>.md`` (the table printed at
the end: method, ms, ratio to the floor, TFLOP/s, peak memory), where ``<out>`` is ``--out`` or a new run
folder ``runs/bench/kernels-<UTC time>/``; never the committed ``kernels/bench/results/`` unless named.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megamix.kernels.bench.args import build_parser
from megamix.kernels.bench.common import (env_info, peak_mb, peak_rss_kb, reset_peak_rss_kb, time_ms,
                                          write_json_csv)
from megamix.kernels.bench.output import conditions_line, default_out_dir, fmt, md_table
from megamix.kernels.domain_gram import per_sample_grads
from megamix.kernels.fused_linear_ce import (U_METHODS, ce_delta_torch, ce_delta_triton,
                                             fused_linear_cross_entropy)
from megamix.kernels.projection import make_projection


# ----------------------------------------------------------------------------------------------
# methods: each returns (forward_fn, backward_fn) closures over fresh leaf tensors
# ----------------------------------------------------------------------------------------------
def _leaves(h, W):
    return h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()


def _floor_method(h, W, chunk: int):
    """The fused step's three GEMMs alone, chunk by chunk: logits = x Wᵀ, dX = logits W, dW += logitsᵀ x (the
    logits stand in for δ; GEMM time does not depend on the values). W is zero-padded to a multiple of 16 rows
    on CUDA exactly as the fused driver does, so the shapes are the same."""
    N, d = h.shape
    Wc = W
    if h.is_cuda and W.shape[0] % 16:
        Wc = torch.cat([W, W.new_zeros(16 - W.shape[0] % 16, d)])
    dX = torch.empty_like(h)

    def fwd():
        dW = Wc.new_zeros(Wc.shape)
        for s in range(0, N, chunk):
            x = h[s:s + chunk]
            logits = torch.mm(x, Wc.t())
            torch.mm(logits, Wc, out=dX[s:s + chunk])
            dW.addmm_(logits.t(), x)
            del logits
        return dW

    return fwd, (lambda state: None), (lambda: None)


def make_method(name: str, h, W, y, proj, chunk: int, backend: str, u_method: str = "fused"):
    """Return ``(fwd, bwd, clear)``; ``fwd()`` returns the state ``bwd(state)`` needs, ``clear()`` drops grads."""
    if name == "floor":
        return _floor_method(h, W, chunk)
    hl, Wl = _leaves(h, W)

    def clear():
        hl.grad = None
        Wl.grad = None

    if name.startswith("fused"):
        p = proj if name.startswith("fused+proj") else None
        B = max(1, h.shape[0] // 2048)
        sample_index = torch.arange(h.shape[0], device=h.device) // 2048

        def fwd():
            clear()
            out = fused_linear_cross_entropy(hl, Wl, y, projection=p, chunk_tokens=chunk, backend=backend,
                                             u_method=u_method)
            if p is not None:
                per_sample_grads(out.u, out.w, sample_index, B, backend=backend)
            return out.loss

        return fwd, (lambda loss: loss.backward()), clear
    if name == "eager+proj" or name == "eager":
        P1t = proj.P1.t().contiguous().to(h.dtype) if proj is not None else None
        P2t = proj.P2.t().contiguous().to(h.dtype) if proj is not None else None

        def fwd():
            clear()
            logits = hl @ Wl.t()
            logits.retain_grad()
            return logits, F.cross_entropy(logits.float(), y)

        def bwd(state):
            logits, loss = state
            loss.backward()
            if name == "eager+proj":
                u = logits.grad @ P1t
                w = hl.detach() @ P2t
                return u, w
        return fwd, bwd, clear
    if name == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        def fwd():
            clear()
            out = LigerFusedLinearCrossEntropyFunction.apply(hl, Wl, y)
            return out[0] if isinstance(out, tuple) else out
        return fwd, (lambda loss: loss.backward()), clear
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def fwd():
            clear()
            return linear_cross_entropy(hl, Wl, y)
        return fwd, (lambda loss: loss.backward()), clear
    raise ValueError(f"unknown method {name!r}")


def _plan(V, d, ks, methods, chunks, u_methods, dev) -> list[tuple]:
    """(label, method, projection, chunk, u_method) of every timed row of one shape, floor first."""
    projs = {(k1, k2): make_projection(V, d, k1, k2, seed=1, device=dev) for k1, k2 in ks}
    plan = []
    for m in sorted(methods, key=lambda m: m != "floor"):
        if m == "fused+proj":
            plan += [(f"fused+proj {k1}x{k2}" if um == "fused" else f"fused+proj[{um}] {k1}x{k2}", m, projs[k], c, um)
                     for c in chunks for k in ks for um in u_methods for k1, k2 in [k]]
        elif m in ("fused", "floor"):
            plan += [(m, m, None, c, None) for c in chunks]
        elif m == "eager+proj":
            plan += [(f"{m} {k1}x{k2}", m, projs[(k1, k2)], None, None) for k1, k2 in ks]
        else:
            plan.append((m, m, None, None, None))
    return plan


def _add_ratios(rows: list[dict]) -> None:
    """Overhead vs ``fused`` at the same chunk size, ratio vs the floor at the same chunk size and vs the best
    floor of the shape, and ratio vs the fastest baseline (eager, Liger, CCE)."""
    ok = [r for r in rows if r["full_ms"]]
    fused = {r["chunk_tokens"]: r["full_ms"] for r in ok if r["method"] == "fused"}
    floor = {r["chunk_tokens"]: r["full_ms"] for r in ok if r["method"] == "floor"}
    best_floor = min(floor.values()) if floor else None
    others = [r["full_ms"] for r in ok if r["method"] in ("liger", "cce") or r["method"].startswith("eager")]
    best = min(others) if others else None
    for r in ok:
        c = r["chunk_tokens"]
        if c in fused and r["method"] != "floor":
            r["overhead_pct_vs_fused"] = 100.0 * (r["full_ms"] / fused[c] - 1.0)
        if c in floor:
            r["ratio_vs_floor"] = r["full_ms"] / floor[c]
        if best_floor:
            r["ratio_vs_best_floor"] = r["full_ms"] / best_floor
        if best:
            r["ratio_vs_best_baseline"] = r["full_ms"] / best


def plan_size(ks, methods, chunks, u_methods) -> int:
    """Number of rows :func:`bench_shape` times for one shape (for the progress bar)."""
    n = 0
    for m in methods:
        n += (len(chunks) * len(ks) * len(u_methods) if m == "fused+proj" else
              len(chunks) if m in ("fused", "floor") else len(ks) if m == "eager+proj" else 1)
    return n


def bench_shape(V, d, N, ks, methods, dtype, chunk, backend, warmup, iters, dev, seed=0, *, chunks=None,
                u_methods=("fused",), progress=None) -> list[dict]:
    """Time every method of one (V, d, N) shape; ``progress`` (a tqdm bar) advances once per row."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(N, d, generator=g) / 2).to(dev, dtype)
    W = (torch.randn(V, d, generator=g) / d ** 0.5).to(dev, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(dev)
    flops = 6.0 * N * V * d
    rows = []
    for label, m, proj, c, um in _plan(V, d, ks, methods, list(chunks or [chunk]), list(u_methods), dev):
        row = {"V": V, "d": d, "N": N, "dtype": str(dtype).replace("torch.", ""), "method": label,
               "u_method": um, "chunk_tokens": c,
               "k1": proj.k1 if proj is not None else None, "k2": proj.k2 if proj is not None else None}
        try:
            fwd, bwd, clear = make_method(m, h, W, y, proj, c or chunk, backend, um or "fused")
            t_full = time_ms(lambda: bwd(fwd()), dev, warmup, iters)
            state_holder = []
            t_fwd = time_ms(lambda: state_holder.append(fwd()) or state_holder.clear(), dev, warmup, iters)
            bwd_times = []
            for _ in range(iters):
                st = fwd()
                bwd_times += time_ms(lambda: bwd(st), dev, 0, 1)
            clear()  # peak counts everything the step allocates, gradients included
            peak = peak_mb(lambda: bwd(fwd()), dev)
            clear()
            row.update(full_ms=statistics.median(t_full), forward_ms=statistics.median(t_fwd),
                       backward_ms=statistics.median(bwd_times), peak_mb=peak,
                       tflops=flops / (statistics.median(t_full) * 1e-3) / 1e12, error=None)
        except Exception as e:  # a missing baseline is reported, not fatal
            row.update(full_ms=None, forward_ms=None, backward_ms=None, peak_mb=None, tflops=None,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        rows.append(row)
        if progress is not None:
            progress.set_postfix_str(f"V={V} d={d} N={N} {label}", refresh=False)
            progress.update()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _add_ratios(rows)
    return rows


def sweep_ce(dev, dtype, C=8192, V=128256, k1=64, warmup=3, iters=10) -> list[dict]:
    """Time the CE/δ pass alone on one logits chunk for several tile configs (with and without P1)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits0 = (torch.randn(C, V, generator=g) * 2).to(dev, dtype)
    y = torch.randint(0, V, (C,), generator=g).to(dev)
    proj = make_projection(V, 64, k1, 16, seed=0, device=dev)
    p1t, s1 = proj.operand("P1", dtype, dev)
    res = []
    tiles = [(16, 128, 4), (16, 256, 8), (32, 128, 4), (32, 256, 8), (16, 64, 4), (64, 64, 4), (32, 64, 4)]
    cfgs = [(kind, *t) for t in tiles for kind in (None, "noproj")]
    logits = logits0.clone()
    for kind, bm, bv, nw in tqdm(cfgs, desc="CE tile sweep", file=sys.stderr):
        p = None if kind == "noproj" else p1t
        try:
            t = time_ms(lambda: (logits.copy_(logits0), ce_delta_triton(logits, y, 1.0 / C, -100, p, s1, block_m=bm,
                                                                        block_v=bv, num_warps=nw)), dev, warmup, iters)
            tc = time_ms(lambda: logits.copy_(logits0), dev, warmup, iters)
            ms = statistics.median(t) - statistics.median(tc)
            res.append({"proj": p is not None, "BM": bm, "BV": bv, "warps": nw, "ce_ms": ms,
                        "GB_per_s": 3 * C * V * logits.element_size() / (ms * 1e-3) / 1e9})
        except Exception as e:
            res.append({"proj": p is not None, "BM": bm, "BV": bv, "warps": nw, "error": str(e)[:200]})
    t = time_ms(lambda: (logits.copy_(logits0), ce_delta_torch(logits, y, 1.0 / C, -100, p1t, s1)), dev, 1, 3)
    res.append({"proj": True, "torch_ce_ms": statistics.median(t)})
    return res


# ----------------------------------------------------------------------------------------------
# CPU: factored vs materialise-then-project
# ----------------------------------------------------------------------------------------------
def _cpu_projection_case(method: str, k1: int = 64, k2: int = 64, V=8192, d=512, B=16, T=128, reps=5) -> dict:
    """Run one projection method from a fixed δ; returns the median ms and the peak-RSS increase (run in a
    fresh subprocess, so that the peak is this method's)."""
    torch.manual_seed(0)
    N = B * T
    proj = make_projection(V, d, k1, k2, seed=0)
    a = torch.randn(N, d)
    delta = torch.softmax(torch.randn(N, V), dim=1) / N
    sample_index = torch.arange(N) // T
    torch.set_num_threads(1)  # one thread: far less sensitive to other processes on a shared machine
    base_rss = reset_peak_rss_kb()
    if base_rss is None:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        if method == "factored":
            u = delta @ proj.P1.t()
            w = a @ proj.P2.t()
            g = per_sample_grads(u, w, sample_index, B, backend="torch")
            extra_bytes = (u.numel() + w.numel() + g.numel()) * 4
        else:
            G = torch.bmm(delta.view(B, T, V).transpose(1, 2), a.view(B, T, d))   # [B, V, d]
            g = (proj.P1 @ G @ proj.P2.t()).reshape(B, -1)
            extra_bytes = (G.numel() + B * k1 * d) * 4
            del G
        times.append((time.perf_counter() - t) * 1e3)
    peak = peak_rss_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "threads": 1, "ms": statistics.median(times), "ms_min": min(times),
            "peak_rss_increase_mb": (peak - base_rss) / 1024,
            "intermediate_mb": extra_bytes / 2**20, "g_checksum": float(g.double().sum())}


#: the CPU projection-ratio shape (full run) and the --quick one
PROJ_SHAPE = {"V": 8192, "d": 512, "B": 16, "T": 128, "reps": 5}
PROJ_SHAPE_QUICK = {"V": 2048, "d": 128, "B": 4, "T": 64, "reps": 2}


def _projection_case_here(m: str, k1: int, k2: int, shape: dict) -> dict:
    """:func:`_cpu_projection_case` in this process (its thread count restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return _cpu_projection_case(m, k1, k2, **shape)
    finally:
        torch.set_num_threads(threads)


def cpu_projection_ratio(ks=((64, 64), (32, 32)), shape: dict | None = None, fresh_process: bool = True) -> list[dict]:
    """Factored vs materialise-then-project (default V=8k, d=512, B=16, T=128), each method in a fresh process
    (so that each peak RSS is its own; ``fresh_process=False``, as ``--quick`` does, runs them here); the ratios
    are of the medians."""
    shape = dict(shape or PROJ_SHAPE)
    results = []
    cases = [(k1, k2, m) for k1, k2 in ks for m in ("factored", "materialise")]
    out: dict = {}
    for k1, k2, m in tqdm(cases, desc="projection ratio", file=sys.stderr):
        if not fresh_process:
            out[m] = _projection_case_here(m, k1, k2, shape)
        else:
            spec = ":".join(str(x) for x in (m, k1, k2, shape["V"], shape["d"], shape["B"], shape["T"], shape["reps"]))
            r = subprocess.run([sys.executable, "-m", "megamix.kernels.bench.bench_fused_lce", "--_cpu-case", spec],
                               capture_output=True, text=True, check=True)
            out[m] = json.loads(r.stdout.strip().splitlines()[-1])
        if m != "materialise":
            continue
        f, m_ = out["factored"], out["materialise"]
        results.append({"factored": f, "materialise": m_, "speedup": m_["ms"] / f["ms"],
                        "intermediate_memory_ratio": m_["intermediate_mb"] / f["intermediate_mb"],
                        "peak_rss_ratio": m_["peak_rss_increase_mb"] / max(f["peak_rss_increase_mb"], 1e-3),
                        "same_result_rel_err": abs(f["g_checksum"] - m_["g_checksum"]) /
                        max(abs(m_["g_checksum"]), 1e-30),
                        "shape": {k: shape[k] for k in ("V", "d", "B", "T")} | {"k1": k1, "k2": k2}})
        out = {}
    return results


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def write_results(out_dir: Path, tag: str, meta: dict, rows: list[dict], extra: dict) -> tuple[Path, Path]:
    keys = ["V", "d", "N", "dtype", "method", "u_method", "k1", "k2", "chunk_tokens", "forward_ms", "backward_ms",
            "full_ms", "tflops", "peak_mb", "overhead_pct_vs_fused", "ratio_vs_floor", "ratio_vs_best_floor",
            "ratio_vs_best_baseline", "error"]
    return write_json_csv(out_dir, tag, meta, rows, extra, keys)


def format_tables(meta: dict, rows: list[dict], extra: dict) -> str:
    """The readable end of a run: conditions, then one table per shape (method, chunk, ms, ratio to the floor,
    overhead vs ``fused``, TFLOP/s, peak memory), then the CPU projection ratio when measured."""
    out = [conditions_line(meta)]
    mem = "peak MB" if str(meta.get("device", "")).startswith("cuda") else "peak RSS +MB"
    shapes = list(dict.fromkeys((r["V"], r["d"], r["N"], r["dtype"]) for r in rows))
    for V, d, N, dt in shapes:
        body = []
        for r in rows:
            if (r["V"], r["d"], r["N"], r["dtype"]) != (V, d, N, dt):
                continue
            if r.get("error"):
                body.append([r["method"], fmt(r["chunk_tokens"], "d"), "error: " + r["error"][:60], "", "",
                             "", ""])
                continue
            ratio = r.get("ratio_vs_floor", r.get("ratio_vs_best_floor"))
            over = r.get("overhead_pct_vs_fused")
            body.append([r["method"], fmt(r["chunk_tokens"], "d"), fmt(r["full_ms"], ".2f"),
                         fmt(ratio, ".2f") + ("" if ratio is None else "×"),
                         "" if over is None or r["method"] == "fused" else f"{over:+.1f}%",
                         fmt(r["tflops"], ".3g"), fmt(r["peak_mb"], ".0f")])
        out += ["", f"V={V} d={d} N={N} {dt}: full step (forward + backward), median ms",
                md_table(["method", "chunk", "ms", "× floor", "vs fused", "TFLOP/s", mem], body)]
    pr = extra.get("projection_ratio")
    if pr:
        sh = pr[0]["shape"]
        body = [[f"{p['shape']['k1']}x{p['shape']['k2']}", fmt(p["factored"]["ms"]), fmt(p["materialise"]["ms"]),
                 f"{p['speedup']:.1f}×", f"{p['intermediate_memory_ratio']:.0f}×", f"{p['peak_rss_ratio']:.1f}×",
                 f"{p['same_result_rel_err']:.1e}"] for p in pr]
        out += ["", f"projection at V={sh['V']} d={sh['d']} B={sh['B']} T={sh['T']}, 1 thread: factored "
                    "(u = P1 δ, w = P2 a, Σ u wᵀ) vs materialise-then-project, median ms",
                md_table(["k1xk2", "factored ms", "materialise ms", "speedup", "intermediates", "peak RSS",
                          "rel. diff"], body)]
    if extra.get("skipped_shapes"):
        out.append(f"skipped (time budget): {extra['skipped_shapes']}")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    if args.cpu_case:
        m, *nums = args.cpu_case.split(":")
        k1, k2, *shape = (int(x) for x in nums)
        kw = dict(zip(("V", "d", "B", "T", "reps"), shape))
        print(json.dumps(_cpu_projection_case(m, k1, k2, **kw)))
        return 0
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if (args.dtype == "bf16" and cuda) else torch.float32
    quick = getattr(args, "quick", False)
    if quick:
        V, d, N = args.V or ([32000] if cuda else [2048]), args.d or ([768] if cuda else [128]), \
            args.N or ([4096] if cuda else [512])
        ks = args.k or [(16, 16)]
    elif cuda:
        V = args.V or [128256, 32000, 50257, 151936]
        d = args.d or [4096, 768, 2048]
        N = args.N or [16384]
        ks = args.k or [(32, 32), (64, 64), (128, 64)]
    else:
        V, d, N = args.V or [8192], args.d or [512], args.N or [2048]
        ks = args.k or [(32, 32), (64, 64)]
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    iters = args.iters if args.iters is not None else (5 if quick else 7)
    methods = [m for m in args.methods.split(",") if m]
    if not cuda:
        methods = [m for m in methods if m not in ("liger", "cce")]
    u_methods = [m for m in args.u_methods.split(",") if m]
    bad = [m for m in u_methods if m not in U_METHODS]
    if bad:
        raise SystemExit(f"bench: --u-methods {','.join(bad)} unknown; use some of {','.join(U_METHODS)}")
    if args.backend == "torch" or not cuda:
        u_methods = [m for m in u_methods if m != "tiled"] or ["fused"]   # tiled is Triton-only
    chunks = args.chunks or [args.chunk]
    if quick and not args.chunks:
        chunks = [min(args.chunk, max(N))]
    meta = env_info(dev)
    meta.update(chunk_tokens=chunks, u_methods=u_methods, warmup=warmup, iters=iters, dtype=str(dtype),
                quick=quick, argv=sys.argv[1:])
    tag = args.tag or f"bench_{'gpu' if cuda else 'cpu'}"
    out_dir = Path(args.out_dir or default_out_dir("kernels"))
    print(f"bench kernels: writing to {out_dir}/", flush=True)
    rows, extra = [], {}
    t0 = time.time()
    if args.sweep_ce and cuda:
        extra["ce_sweep"] = sweep_ce(dev, dtype)
        write_results(out_dir, tag, meta, rows, extra)
    shapes = [(v, dd, n) for v in V for dd in d for n in N]
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split(":")) for sh in args.shapes.split(",") if sh]
    total = len(shapes) * plan_size(ks, methods, chunks, u_methods)
    with tqdm(total=total, desc="bench kernels", unit="row", file=sys.stderr) as bar:
        for v, dd, n in shapes:
            if time.time() - t0 > args.time_budget:
                extra.setdefault("skipped_shapes", []).append([v, dd, n])
                continue
            rows += bench_shape(v, dd, n, ks, methods, dtype, args.chunk, args.backend, warmup, iters, dev,
                                chunks=chunks, u_methods=u_methods, progress=bar)
            write_results(out_dir, tag, meta, rows, extra)
    if not cuda:
        extra["projection_ratio"] = cpu_projection_ratio(ks=[ks[0]] if quick else ((64, 64), (32, 32)),
                                                         shape=PROJ_SHAPE_QUICK if quick else PROJ_SHAPE,
                                                         fresh_process=not quick)
    jp, cp = write_results(out_dir, tag, meta, rows, extra)
    table = format_tables(meta, rows, extra)
    mp = out_dir / f"{tag}.md"
    mp.write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    print(f"wrote {jp}, {cp.name} and {mp.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))

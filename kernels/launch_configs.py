"""Launch configurations of megamix's Triton kernels: the one place the launchers take tiles, warps and
stages from.

Every launcher in ``kernels/`` asks this module for its configuration, so the compile gate
(:mod:`megamix.kernels.compile_gate`, which compiles each kernel ahead of time for the GPUs we support) sees
exactly the configurations the launchers can choose.

On a GPU the configurations come from resource tables, so that every configuration fits the shared memory
of an A100 (sm_80), H100/H200 (sm_90) and B200 (sm_100) — :data:`SHARED_MEMORY_LIMITS` — and spills as little as
the policy allows. A k1 (or a segment_outer k1×k2) outside the tables raises ``ValueError`` naming the limit,
instead of ``OutOfResources`` at the first launch. The tables were derived by compiling
(``python -m megamix.kernels.compile_gate --search``, triton 3.7.1; kernels/README.md) with this policy:

- candidates, in order of preference (:func:`ce_candidates`, :func:`proj_u_candidates`,
  :func:`segment_outer_candidates`): today's configuration first, then fewer pipeline stages, then a narrower
  tile (BV for the CE pass, BM for the tiled projection; more warps, then BT, for segment_outer); never one stage
  (no pipelining), never BV < 64 for the CE pass (the V sweep would take over 2000 iterations per 16 rows at
  V = 128k, each thread loading less than 16 bytes);
- a candidate *fits* when its shared memory is within the limit of every target, at k1 = BK1 with every size
  16-aligned (cp.async pipelining applies: the most shared memory) and at the bucket's smallest k1 with unaligned
  sizes (the most registers);
- CE pass: the widest vocab tile that fits at some stage count, so 16×256 is kept wherever it fits (the
  online-softmax order, hence δ, then does not depend on the projection); among its stage counts the first within
  the spill budget, else the least spilling. Tiled projection and segment_outer: the first candidate that fits
  within the spill budget, else the fitting one that spills least. The spill budget is :data:`SPILL_BUDGET` bytes
  of spill stores per thread, :data:`DEFAULT_SPILL_BUDGET` for the default configurations;
- :func:`max_k1` is the largest BK1 with a fitting candidate for both k1 kernels (fused CE pass and tiled
  projection); at 2·max_k1 even the smallest candidate needs more than the A100 has (:data:`REFUSED`).

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU test suite) the tiles are larger and
the stages irrelevant: the interpreter's cost is per program and per loop iteration, not per byte.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from megamix.kernels.utils import cdiv, next_pow2


class LaunchConfig(NamedTuple):
    """Tiles and launch options of one kernel launch. ``num_stages`` None = Triton's default."""

    block_m: int
    block_v: int
    num_warps: int
    num_stages: int | None = None


# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------
#: Per-block shared memory, opt-in maximum, in bytes, of the GPUs every configuration must fit (by compute
#: capability): A100 163 KB; H100 / H200 227 KB; B200 227 KB.
SHARED_MEMORY_LIMITS = {80: 166_912, 90: 232_448, 100: 232_448}
GPU_NAMES = {80: "A100", 90: "H100/H200", 100: "B200"}
#: Register spills (bytes of spill stores per thread, ptxas -v). The default configurations may spill at most
#: DEFAULT_SPILL_BUDGET (16 B = 4 registers; ptxas for sm_100 spills 4 B in today's bf16 k1 = 32 tile); elsewhere
#: the tables prefer candidates within SPILL_BUDGET (32 fp32 values per thread, L1-resident) and otherwise take
#: the fitting candidate that spills least.
DEFAULT_SPILL_BUDGET = 16
SPILL_BUDGET = 128
#: The default configurations (the shipped configs and ProjectionConfig's defaults: k1 32 / 64, k2 16 / 32 / 64;
#: and no projection at all): held to DEFAULT_SPILL_BUDGET.
DEFAULT_K1 = (32, 64)
DEFAULT_K2 = (16, 32, 64)
#: segment_outer's range (the per-sample reduction, not on the training path): k2 ≤ MAX_K2 and
#: BK1·BK2 ≤ MAX_K1K2 fp32 accumulators (more would spill kilobytes per thread even with 16 warps).
MAX_K2 = 512
MAX_K1K2 = 32768

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` for a torch dtype (or one of those names)."""
    if isinstance(dtype, str):
        if dtype in ("bf16", "fp16", "fp32"):
            return dtype
    elif dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ValueError(f"no launch configuration for dtype {dtype} (fp32, fp16, bf16)")


# ----------------------------------------------------------------------------------------------
# The candidates, in order of preference (the policy; compile_gate --search walks them)
# ----------------------------------------------------------------------------------------------
_CE_TODAY = LaunchConfig(16, 256, 8)


def ce_candidates(bk1: int) -> list[LaunchConfig]:
    """CE pass with the projection: today's tile and stages, then fewer stages, then BV 128 and 64."""
    today = LaunchConfig(16, 256, 8, None if bk1 < 128 else 2)
    today_stages = today.num_stages or 3
    out = [today]
    for bv in (256, 128, 64):
        for s in (3, 2):
            if bv == 256 and s >= today_stages:
                continue
            out.append(LaunchConfig(16, bv, 8, s))
    return out


def proj_u_candidates(bk1: int) -> list[LaunchConfig]:
    """Tiled projection: today's 128-row tile, then fewer stages, then 64-, 32- and 16-row tiles."""
    out = [LaunchConfig(128, 64, 8)]
    for bm in (128, 64, 32, 16):
        for s in (3, 2):
            if bm == 128 and s == 3:
                continue
            out.append(LaunchConfig(bm, 64, 8, s))
    return out


def segment_outer_candidates() -> list[LaunchConfig]:
    """segment_outer: today's 32 tokens with 4 warps, then more warps (fewer accumulators per thread), then fewer
    stages and 16-token tiles."""
    out = []
    for w in (4, 8, 16):
        for bt, s in ((32, None), (32, 2), (16, 2)):
            out.append(LaunchConfig(bt, 0, w, s))
    return out


# ----------------------------------------------------------------------------------------------
# The tables (compile_gate --search; checked on every test run by tests/test_kernels_compile.py)
# ----------------------------------------------------------------------------------------------
_L = LaunchConfig
#: CE pass with the projection, by (dtype, BK1). 16x256 / 8 warps wherever it fits at some stage count (bf16 / fp16
#: up to BK1 256, fp32 up to 128); today's stages (Triton's default 3 below BK1 128, else 2) wherever they fit.
_CE_PROJ: dict[tuple[str, int], LaunchConfig] = {
    **{(d, b): _L(16, 256, 8) for d in ("bf16", "fp16", "fp32") for b in (16, 32)},
    ("bf16", 64): _L(16, 256, 8), ("fp16", 64): _L(16, 256, 8),
    ("fp32", 64): _L(16, 256, 8, 2),      # 3 stages need 176 KB: above the A100's 163 KB
    **{(d, 128): _L(16, 256, 8, 2) for d in ("bf16", "fp16", "fp32")},
    ("bf16", 256): _L(16, 256, 8, 2), ("fp16", 256): _L(16, 256, 8, 2),
    ("fp32", 256): _L(16, 128, 8, 2),     # 16x256 needs 288 KB (2 stages)
    ("bf16", 512): _L(16, 128, 8, 2), ("fp16", 512): _L(16, 128, 8, 2),
    ("fp32", 512): _L(16, 64, 8, 2),
    ("bf16", 1024): _L(16, 64, 8, 2), ("fp16", 1024): _L(16, 64, 8, 2),
}
#: tiled projection, by (dtype, BK1): 128 rows wherever they fit without spilling more than the budget
_PROJ_U: dict[tuple[str, int], LaunchConfig] = {
    **{(d, b): _L(128, 64, 8) for d in ("bf16", "fp16") for b in (16, 32, 64, 128, 256)},
    **{(d, 512): _L(32, 64, 8, 3) for d in ("bf16", "fp16")},
    **{(d, 1024): _L(16, 64, 8, 2) for d in ("bf16", "fp16")},
    **{("fp32", b): _L(128, 64, 8) for b in (16, 32, 64, 128)},
    ("fp32", 256): _L(64, 64, 8, 3),      # 128 rows need 192 KB (3 stages) or spill 1.7 KB (2 stages)
    ("fp32", 512): _L(32, 64, 8, 2),
}
#: segment_outer, by BK1·BK2 (the fp32 accumulator's size)
_SEGMENT_OUTER: dict[int, LaunchConfig] = {
    **{p: _L(32, 0, 4) for p in (256, 512, 1024, 2048, 4096)},
    8192: _L(16, 0, 4, 2),
    16384: _L(16, 0, 8, 2),
    32768: _L(16, 0, 16, 2),
}
#: per dtype, the first BK1 bucket with no fitting candidate (2·max_k1) for each k1 kernel: (kernel, the policy's
#: smallest tile there, its shared memory on sm_80 in bytes). The smallest tile needs the least shared memory, so no
#: candidate fits; compile_gate compiles these on every run and the test checks the numbers.
REFUSED: dict[str, list[tuple[str, LaunchConfig, int]]] = {
    **{d: [("_ce_delta_proj_kernel", _L(16, 64, 8, 2), 266_240),        # BK1 2048: 260 KB
           ("_proj_u_kernel", _L(16, 64, 8, 2), 264_192)] for d in ("bf16", "fp16")},   # 258 KB
    "fp32": [("_ce_delta_proj_kernel", _L(16, 64, 8, 2), 270_336),     # BK1 1024: 264 KB
             ("_proj_u_kernel", _L(16, 64, 8, 2), 266_240)],           # 260 KB
}


#: the largest BK1 bucket with a configuration for both k1 kernels, per dtype
_MAX_K1 = {d: max(b for (dd, b) in _CE_PROJ if dd == d and (d, b) in _PROJ_U) for d in ("bf16", "fp16", "fp32")}


def max_k1(dtype: torch.dtype | str | None = None) -> int:
    """The largest k1 with a fitting configuration for the projection kernels (fused CE pass and tiled
    projection) with ``dtype`` logits: 1024 for bf16 / fp16, 512 for fp32. None: the smallest over the three (what
    a config, which does not know the logits dtype, may accept)."""
    if dtype is None:
        return min(_MAX_K1.values())
    return _MAX_K1[dtype_name(dtype)]


def k1_limit_message(k1: int, dtype: torch.dtype | str | None = None, kernel: str = "_ce_delta_proj_kernel") -> str:
    """One line: what ``k1`` above :func:`max_k1` needs in ``kernel`` and the largest k1 that fits."""
    if dtype is None:   # the dtype with the smallest limit
        d = min(("fp32", "fp16", "bf16"), key=lambda x: max_k1(x))
    else:
        d = dtype_name(dtype)
    kern, tile, need = next(x for x in REFUSED[d] if x[0] == kernel)
    what = "fused CE kernel" if kern == "_ce_delta_proj_kernel" else "tiled projection kernel"
    return (f"k1={k1} needs at least {need / 1024:.0f} KB of GPU shared memory per block in the {what} with {d} "
            f"logits (its smallest tile, {tile.block_m}x{tile.block_v} with {tile.num_stages} stages), above the "
            f"A100's {SHARED_MEMORY_LIMITS[80] // 1024} KB; the largest k1 that fits every supported GPU is "
            f"{max_k1(d)}")


def _lookup(table: dict, d: str, k1: int, kernel: str) -> LaunchConfig:
    cfg = table.get((d, next_pow2(k1, 16)))
    if cfg is None or k1 > max_k1(d):
        raise ValueError(k1_limit_message(k1, d, kernel) + " (projection.k1; or u_method='gemm')")
    return cfg


# ----------------------------------------------------------------------------------------------
# What the launchers call
# ----------------------------------------------------------------------------------------------
def ce_pass(C: int, dtype: torch.dtype | str, k1: int | None, *, interpret: bool) -> LaunchConfig:
    """The CE pass kernels (``_ce_delta_proj_kernel``, ``_ce_shard_stats_kernel``, ``_ce_shard_delta_kernel``)
    for a chunk of ``C`` rows of ``dtype`` logits; ``k1`` the projection's rows (None: no projection).

    The 16×256 tile of the projection-off pass is kept with the projection wherever it fits (every dtype up to
    k1 = 128, bf16 / fp16 up to 256: see the table). Above that the projection's sweep needs a narrower vocab
    tile for P1ᵀ to fit shared memory; the max / sum-exp sweep of ``_ce_delta_proj_kernel`` still runs at the
    projection-off tile (its ``BV_STATS``), so the log-sum-exp, δ and the training gradients stay bit-identical
    with the projection on or off at every k1. (The vocab-parallel pass A is a kernel of its own, launched
    without the projection.)"""
    if interpret:
        return LaunchConfig(min(64, next_pow2(C, 16)), 64, 4)
    # 16x256 with 8 warps: the fastest tile of an H200 sweep without the projection (1.69 ms per
    # 8192x128256 bf16 chunk) and within 6% of the fastest with k1=64 (kernels/bench/results/gpu_h200).
    if k1 is None:
        return _CE_TODAY
    return _lookup(_CE_PROJ, dtype_name(dtype), k1, "_ce_delta_proj_kernel")


def proj_u(C: int, V: int, dtype: torch.dtype | str, k1: int, *, interpret: bool) -> LaunchConfig:
    """The ``tiled`` projection kernel ``_proj_u_kernel``: 128-row tiles (P1ᵀ is streamed once per 128 rows)
    where they fit without spilling, smaller for large k1 (the table); the V slices come from
    :func:`proj_u_splits`."""
    if interpret:
        return LaunchConfig(min(64, next_pow2(C, 16)), 64, 4)
    return _lookup(_PROJ_U, dtype_name(dtype), k1, "_proj_u_kernel")


def proj_u_splits(C: int, V: int, block_m: int, block_v: int, *, interpret: bool,
                  device: torch.device | None = None) -> int:
    """How many V slices the ``tiled`` projection uses: about two programs per SM on a GPU (two slices in
    the interpreter, so the tests exercise the split-V reduction too)."""
    target = 2
    if not interpret and device is not None and device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(target, cdiv(max(C, 1), block_m)), cdiv(V, block_v)))


def segment_outer(k1: int, k2: int, *, interpret: bool) -> LaunchConfig:
    """``_segment_outer_kernel`` (the per-sample reduction): ``block_m`` tokens per tile; more warps (and
    smaller tiles) as the ``BK1 × BK2`` fp32 accumulator grows (the table). Supported: k1 ≤ the largest
    :func:`max_k1`, k2 ≤ :data:`MAX_K2`, BK1·BK2 ≤ :data:`MAX_K1K2`."""
    if interpret:
        return LaunchConfig(64, 0, 4)
    bk1, bk2 = next_pow2(k1, 16), next_pow2(k2, 16)
    cfg = _SEGMENT_OUTER.get(bk1 * bk2)
    k1_hi = max(_MAX_K1.values())
    if cfg is None or k1 > k1_hi or k2 > MAX_K2:
        raise ValueError(f"segment_outer supports k1 <= {k1_hi}, k2 <= {MAX_K2} and next_pow2(k1)·next_pow2(k2) <= "
                         f"{MAX_K1K2} (its fp32 accumulator is kept in registers), got k1={k1}, k2={k2}; use "
                         "backend='torch' or tokens_per_sample=")
    return cfg


def scale(dtype: torch.dtype, *, interpret: bool) -> LaunchConfig:
    """``_scale_kernel`` (the backward's in-place fp32 scaling of dX / dW): ``block_m`` elements per program."""
    return LaunchConfig(1024, 0, 4)


__all__ = ["LaunchConfig", "SHARED_MEMORY_LIMITS", "SPILL_BUDGET", "MAX_K2", "MAX_K1K2", "ce_pass", "proj_u",
           "proj_u_splits", "segment_outer", "scale", "max_k1", "k1_limit_message", "dtype_name"]

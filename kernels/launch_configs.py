"""Launch configurations of megamix's Triton kernels: the one place the launchers take tiles, warps and
stages from.

Every launcher in ``kernels/`` asks this module for its configuration, so the compile gate (which
compiles each kernel ahead of time for the GPUs we support) sees exactly the configurations the
launchers can choose.

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


def ce_pass(C: int, dtype: torch.dtype, k1: int | None, *, interpret: bool) -> LaunchConfig:
    """The CE pass kernels (``_ce_delta_proj_kernel``, ``_ce_shard_stats_kernel``, ``_ce_shard_delta_kernel``)
    for a chunk of ``C`` rows of ``dtype`` logits; ``k1`` the projection's rows (None: no projection).

    The row tile and vocab tile are the same with or without the projection, so the online-softmax order
    (hence δ and the training gradients) never depends on it."""
    if interpret:
        return LaunchConfig(min(64, next_pow2(C, 16)), 64, 4)
    # 16x256 with 8 warps: the fastest tile of an H200 sweep without the projection (1.69 ms per
    # 8192x128256 bf16 chunk) and within 6% of the fastest with k1=64 (kernels/bench/results/gpu_h200).
    stages = 2 if (k1 is not None and next_pow2(k1, 16) >= 128) else None
    return LaunchConfig(16, 256, 8, stages)


def proj_u(C: int, V: int, dtype: torch.dtype, k1: int, *, interpret: bool) -> LaunchConfig:
    """The ``tiled`` projection kernel ``_proj_u_kernel``: 128-row tiles (P1ᵀ is streamed once per 128 rows);
    the V slices come from :func:`proj_u_splits`."""
    if interpret:
        return LaunchConfig(min(64, next_pow2(C, 16)), 64, 4)
    return LaunchConfig(128, 64, 8)


def proj_u_splits(C: int, V: int, block_m: int, block_v: int, *, interpret: bool,
                  device: torch.device | None = None) -> int:
    """How many V slices the ``tiled`` projection uses: about two programs per SM on a GPU (two slices in
    the interpreter, so the tests exercise the split-V reduction too)."""
    target = 2
    if not interpret and device is not None and device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(target, cdiv(max(C, 1), block_m)), cdiv(V, block_v)))


def segment_outer(k1: int, k2: int, *, interpret: bool) -> LaunchConfig:
    """``_segment_outer_kernel`` (per-sample / per-domain reduction): ``block_m`` tokens per tile."""
    return LaunchConfig(64 if interpret else 32, 0, 4)


__all__ = ["LaunchConfig", "ce_pass", "proj_u", "proj_u_splits", "segment_outer"]

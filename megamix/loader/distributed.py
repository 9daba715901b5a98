"""Keeping mixture weights and sampler state identical on every data-parallel rank.

megamix's rule is **rank 0 decides and broadcasts**: the strategy runs on all ranks (it is
deterministic on all-reduced statistics), but only rank 0's proposal is used, and it reaches the
other ranks bit for bit through :func:`broadcast_weights`. That removes any dependence on
floating-point agreement between ranks. :func:`verify_consistent` is the debug-mode check: it
all-reduces a checksum of the sampler state (MIN and MAX) and raises if any rank differs.

Every function takes the process group as an argument; ``group=None`` means the default group.
Outside an initialised ``torch.distributed`` job the functions are no-ops (a single process). The
collectives go through :mod:`megamix.comm` (device from the group's backend, source = the group's first rank).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from megamix import comm


def broadcast_weights(weights, group=None, src: int | None = None, *, check: bool = True,
                      from_rank: int = 0) -> np.ndarray:
    """Return the deciding rank's weights on every rank (float64, bit-identical).

    Args:
        weights: this rank's weights (only the deciding rank's values are used; every rank must pass the
            same length).
        group: a ``torch.distributed`` process group (``None`` = default group).
        src: the deciding rank as a *global* rank, which must be a member of ``group`` (default: the group's
            first rank, whatever its global rank: a Megatron data-parallel group ``{1, 3}`` decides on global
            rank 1). A ``src`` outside the group is a ``ValueError``.
        check: first check (one more small collective) that every rank passes the same length; a caller whose
            lengths agree by construction (the Mixer: the same domains on every rank) may skip it.
        from_rank: the deciding rank as a rank *of the group* (default 0, its first rank; e.g. the last rank of a
            pipeline group, where the LM head and the statistics live).

    Costs one broadcast on the group's device (for NCCL: the current GPU), i.e. one host-to-device copy on
    every rank and one device-to-host copy on the ranks other than the decider.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if comm.size(group) == 1:
        return w.copy()
    if src is not None:
        from_rank = comm.group_rank_of(int(src), group)
    dev = comm.device_for(group)
    if check:
        sizes = [int(x) for x in torch.cat(comm.all_gather(torch.tensor([w.size], dtype=torch.int64, device=dev),
                                                           group)).tolist()]
        if min(sizes) != max(sizes):
            raise ValueError(f"broadcast_weights: ranks passed weight vectors of different lengths ({sizes})")
    t = torch.from_numpy(w.copy()).to(dev, non_blocking=True)
    comm.broadcast(t, group, from_rank=from_rank)
    if comm.rank(group) == from_rank:
        return w.copy()     # the decider's own values: no copy back from the device
    return t.cpu().numpy().astype(np.float64)


def verify_consistent(value: int, group=None, what: str = "sampler state") -> None:
    """Raise ``RuntimeError`` unless the int64 ``value`` (e.g. ``sampler.checksum()``) is equal on all ranks."""
    if comm.size(group) == 1:
        return
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm.device_for(group))
    seen = torch.cat(comm.all_gather(t, group)).tolist()
    lo, hi = min(seen), max(seen)
    if lo != hi:
        raise RuntimeError(f"{what} differs across ranks (checksums range {lo}..{hi}; "
                           f"this rank {int(value)}): weights must come from broadcast_weights and "
                           "every rank must load the same checkpoint")


def weights_checksum(weights) -> int:
    """Signed 64-bit digest of a weight vector's exact float64 bytes."""
    b = np.ascontiguousarray(np.asarray(weights, dtype="<f8")).tobytes()
    return int.from_bytes(hashlib.sha256(b).digest()[:8], "little", signed=True)

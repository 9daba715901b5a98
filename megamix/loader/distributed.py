"""Keeping mixture weights and sampler state identical on every data-parallel rank.

megamix's rule is **rank 0 decides and broadcasts**: the strategy runs on all ranks (it is
deterministic on all-reduced statistics), but only rank 0's proposal is used, and it reaches the
other ranks bit for bit through :func:`broadcast_weights`. That removes any dependence on
floating-point agreement between ranks. :func:`verify_consistent` is the debug-mode check: it
all-reduces a checksum of the sampler state (MIN and MAX) and raises if any rank differs.

Every function takes the process group as an argument; ``group=None`` means the default group.
Outside an initialised ``torch.distributed`` job the functions are no-ops (a single process).
"""
from __future__ import annotations

import numpy as np


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _device(group) -> "object":
    import torch
    dist = _dist()
    backend = dist.get_backend(group) if dist is not None else "gloo"
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_weights(weights, group=None, src: int = 0) -> np.ndarray:
    """Return ``src``'s weights on every rank (float64, bit-identical).

    Args:
        weights: this rank's weights (only ``src``'s values are used; every rank must pass the
            same length).
        group: a ``torch.distributed`` process group (``None`` = default group).
        src: global rank that decides.
    """
    import torch
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    dist = _dist()
    if dist is None:
        return w.copy()
    dev = _device(group)
    n = torch.tensor([w.size], dtype=torch.int64, device=dev)
    lo, hi = n.clone(), n.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if lo.item() != hi.item():
        raise ValueError(f"broadcast_weights: ranks passed weight vectors of different lengths "
                         f"({lo.item()}..{hi.item()})")
    t = torch.from_numpy(w.copy()).to(dev)
    dist.broadcast(t, src=src, group=group)
    return t.cpu().numpy().astype(np.float64)


def verify_consistent(value: int, group=None, what: str = "sampler state") -> None:
    """Raise ``RuntimeError`` unless the int64 ``value`` (e.g. ``sampler.checksum()``) is equal on all ranks."""
    import torch
    dist = _dist()
    if dist is None:
        return
    dev = _device(group)
    lo = torch.tensor([int(value)], dtype=torch.int64, device=dev)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if lo.item() != hi.item():
        raise RuntimeError(f"{what} differs across ranks (checksums range {lo.item()}..{hi.item()}; "
                           f"this rank {int(value)}): weights must come from broadcast_weights and "
                           "every rank must load the same checkpoint")


def weights_checksum(weights) -> int:
    """Signed 64-bit digest of a weight vector's exact float64 bytes."""
    import hashlib
    b = np.ascontiguousarray(np.asarray(weights, dtype="<f8")).tobytes()
    return int.from_bytes(hashlib.sha256(b).digest()[:8], "little", signed=True)

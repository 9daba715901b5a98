"""Small helpers shared by the kernel modules (backend selection, padding sizes, Triton import)."""
from __future__ import annotations

import contextlib
import os

import torch

from megamix import comm

try:  # Triton is optional: the torch backends work without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to ``triton`` on CUDA devices (when Triton is importable) and ``torch`` otherwise.

    ``triton`` on a CPU tensor is allowed only under the Triton interpreter (tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not importable; use backend='torch'")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton "
                               "is imported (tests do this in conftest.py); use backend='torch' on CPU")
    return backend


def no_autocast(device: torch.device | str):
    """Autocast off on ``device``'s type: the statistics (u, w, g_i, their sums) are fp32 by contract, also when
    they are computed inside a caller's ``torch.autocast`` region. A device type autocast does not know (e.g.
    ``meta``) needs nothing."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (tl.dot needs dims >= 16 on GPUs)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def group_size(group=None) -> int:
    """World size of a torch.distributed process group (None = default group); 1 when torch.distributed
    is unavailable or not initialised."""
    return comm.size(group)


def all_reduce_(tensor: torch.Tensor, op: str, group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (``op``: ``"sum"`` or ``"max"``) over ``group`` through
    :func:`megamix.comm.all_reduce`; a no-op when the group has one rank. Every rank of the group must call
    it. Returns ``tensor``."""
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce_: op must be 'sum' or 'max', got {op!r}")
    return comm.all_reduce(tensor, op, group)

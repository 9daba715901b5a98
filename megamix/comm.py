"""Every collective megamix issues goes through this module: one owner of communication.

Why one owner: NCCL's rule is *device tensors only*, and a collective's ``src`` is a *global* rank. Code
that met only gloo on a CPU breaks both rules on GPUs (a CPU statistics tensor handed to an NCCL group;
``src=0`` inside a Megatron data-parallel subgroup that does not hold global rank 0). Here they are decided
once:

- **Device.** :func:`device_for` picks where a collective's tensors must live from the devices the group's
  backend serves (``group._device_types``): the current CUDA device for NCCL (or a ``cuda:gloo`` group), the
  CPU for gloo. A tensor elsewhere is copied there and back (:func:`all_reduce`, :func:`broadcast`,
  :func:`all_gather`); callers keep their tensors where they were computed.
- **Source.** :func:`broadcast` and :func:`broadcast_object` send from the group's first rank
  (``group_src=0``), whatever its global rank.
- **Failures.** :func:`together` runs work that only some ranks do (rank 0 writes a file) and then makes
  every rank of the group agree on the outcome: if any rank failed, every rank raises the same one-line
  :class:`RankFailure` within one collective's time, instead of the others waiting in their next collective
  until the process group's timeout.

Every function takes the process group as an argument (``None`` = the default group) and is a no-op or
the identity outside an initialised ``torch.distributed`` job or in a group of one rank. This module is the
lowest layer of megamix: it imports only torch (``kernels/`` uses it for the tensor-parallel all-reduces).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megamix.configbase import ConfigError, MegamixError

log = logging.getLogger("megamix")

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}

#: A "group" of this process alone: every function treats it as one rank (no communication), whatever
#: process group may be initialised (e.g. a single-process backend inside a larger job).
LOCAL = object()


class RankFailure(ConfigError):
    """Work of one rank failed, and every rank of the group stops with this same one-line error (the CLI
    prints it and exits with code 2). ``rank`` is the (lowest) failing rank of the group, ``what`` the work."""

    def __init__(self, message: str, rank: int, what: str):
        super().__init__(message)
        self.rank = rank
        self.what = what


# ------------------------------------------------------------------------------------------ the group
def active() -> bool:
    """Whether a ``torch.distributed`` job is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def size(group: Any = None) -> int:
    """Number of ranks in ``group`` (1 outside a distributed job, and for :data:`LOCAL`)."""
    return dist.get_world_size(group) if active() and group is not LOCAL else 1


def rank(group: Any = None) -> int:
    """This process's rank inside ``group`` (0 outside a distributed job, and for :data:`LOCAL`)."""
    return dist.get_rank(group) if active() and group is not LOCAL else 0


def src_rank(group: Any = None) -> int:
    """The *global* rank of ``group``'s first rank: what a collective's ``src=`` means (0 for the default
    group; e.g. 1 for a Megatron data-parallel group ``{1, 3}``)."""
    if not active() or group is None or group is LOCAL or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def group_rank_of(global_rank: int, group: Any = None) -> int:
    """The rank *inside* ``group`` of the process with global rank ``global_rank`` (a ``ValueError`` naming the
    group's members when it is not one)."""
    if not active() or group is None or group is LOCAL or group is dist.group.WORLD:
        if not 0 <= int(global_rank) < size(group):
            raise ValueError(f"global rank {global_rank} is not in the default group of {size(group)} ranks")
        return int(global_rank)
    members = dist.get_process_group_ranks(group)
    if int(global_rank) not in members:
        raise ValueError(f"global rank {global_rank} is not in this process group (its global ranks: {members}); a "
                         "collective's source must be a member, e.g. the group's first rank")
    return members.index(int(global_rank))


def _device_types(group: Any) -> list[str]:
    pg = group if group is not None else dist.group.WORLD
    types = getattr(pg, "_device_types", None)
    if types:
        return [torch.device(t).type for t in types]
    backend = str(dist.get_backend(group)).lower()   # older torch: infer from the backend's name
    if backend == "nccl":
        return ["cuda"]
    return ["cpu", "cuda"] if backend == "gloo" else ["cpu"]


def device_for(group: Any = None, prefer: torch.device | str | None = None) -> torch.device:
    """The device a collective's tensors must be on for ``group``'s backend.

    ``prefer`` (e.g. the tensor's own device) wins when the backend serves it, so no copy is made. Otherwise:
    the CPU when the backend serves CPU tensors (gloo), else the current CUDA device (NCCL, ``cuda:gloo``).
    Outside a distributed job: ``prefer`` or the CPU."""
    if prefer is not None:
        prefer = torch.device(prefer)
    if not active() or group is LOCAL:
        return prefer or torch.device("cpu")
    types = _device_types(group)
    if prefer is not None and prefer.type in types:
        return prefer
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0] if types else "cuda"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _on_group_device(t: torch.Tensor, group: Any) -> torch.Tensor:
    dev = device_for(group, prefer=t.device)
    return t if t.device == dev else t.to(dev)


# ------------------------------------------------------------------------------------------ tensors
def all_reduce(t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """All-reduce ``t`` in place over ``group`` (``op``: ``sum`` | ``max`` | ``min``) and return it. A tensor on
    a device the backend does not serve is reduced on the group's device and copied back. Every rank of the
    group must call it; with one rank it returns ``t`` unchanged."""
    if op not in _OPS:
        raise ValueError(f"all_reduce: op must be one of {', '.join(_OPS)}, got {op!r}")
    if size(group) == 1:
        return t
    work = _on_group_device(t, group)
    if not work.is_contiguous():
        work = work.contiguous()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_gather(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in group-rank order, on ``t``'s device."""
    if size(group) == 1:
        return [t]
    work = _on_group_device(t, group).contiguous()
    outs = [torch.empty_like(work) for _ in range(size(group))]
    dist.all_gather(outs, work, group=group)
    return outs if work.device == t.device else [o.to(t.device) for o in outs]


def broadcast(t: torch.Tensor, group: Any = None, from_rank: int = 0) -> torch.Tensor:
    """``t`` of one rank of the group, on every rank (in place; returned): the group's first rank by default, or
    group rank ``from_rank`` (e.g. the last stage of a pipeline group). Every rank passes a tensor of the same
    shape and dtype."""
    if size(group) == 1:
        return t
    if not 0 <= from_rank < size(group):
        raise ValueError(f"broadcast: from_rank={from_rank} is not a rank of the group (size {size(group)})")
    work = _on_group_device(t, group)
    if not work.is_contiguous():
        work = work.contiguous()
    dist.broadcast(work, group=group, group_src=from_rank)
    if work is not t:
        t.copy_(work)
    return t


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group`` (a one-element all-reduce on the group's device, which every backend
    serves, rather than ``dist.barrier``, which guesses a device for NCCL)."""
    if size(group) > 1:
        dist.all_reduce(torch.zeros(1, device=device_for(group)), group=group)


def shutdown(group: Any = None, wait: bool = True) -> None:
    """End the job's communication: wait for every rank of ``group`` (default: the whole job), then destroy the
    default process group and every subgroup. Destroying while a peer is still inside a collective can abort the
    process at exit ("terminate called without an active exception" from gloo's threads, seen once in about
    100 two-rank runs on a loaded 2-core machine); the barrier first makes every rank leave its last collective
    before any rank tears down. ``wait=False`` skips the barrier, for a rank leaving on an error that the
    others may not share. A no-op outside an initialised job."""
    if not active():
        return
    if wait and size(group) > 1:
        barrier(group)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ objects
def broadcast_object(obj: Any, group: Any = None) -> Any:
    """A picklable object of the group's first rank, on every rank."""
    if size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=0, device=device_for(group))
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order."""
    if size(group) == 1:
        return [obj]
    out: list[Any] = [None] * size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ------------------------------------------------------------------------------------------ failures
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, MegamixError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def agree(error: BaseException | None, what: str, group: Any = None) -> None:
    """Collective: every rank passes the exception its part of ``what`` raised, or None. If any rank failed,
    every rank raises the same :class:`RankFailure` naming the lowest failing rank and its error (one line).
    Outside a distributed job the error, if any, is raised as it is."""
    if size(group) == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else _one_line(error)
    if error is not None and not isinstance(error, (MegamixError, OSError)):
        # an unexpected error: keep its traceback in this rank's log; the others get the one line
        log.error("megamix: rank %d failed %s", rank(group), what, exc_info=error)
    reports = all_gather_object(mine, group)
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if not failed:
        return
    r, msg = failed[0]
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    exc = RankFailure(f"rank {r} of {len(reports)} failed {what}{others}: {msg}", r, what)
    if error is not None:
        raise exc from error
    raise exc


@contextlib.contextmanager
def together(what: str, group: Any = None) -> Iterator[None]:
    """Run a block that may fail on some ranks only (e.g. ``if rank == 0: write(...)``), then agree: if any rank
    raised, every rank of ``group`` raises the same :class:`RankFailure` (see :func:`agree`). The block must not
    call collectives itself: a rank that fails before one would leave the others waiting in it. The agreement
    is itself a synchronisation point, so it also serves as the barrier after the block."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        agree(e, what, group)   # raises: the RankFailure, or with one rank the error itself
    agree(None, what, group)


__all__ = ["LOCAL", "RankFailure", "active", "size", "rank", "src_rank", "group_rank_of", "device_for", "all_reduce", "all_gather",
           "broadcast", "barrier", "shutdown", "broadcast_object", "all_gather_object", "agree", "together"]

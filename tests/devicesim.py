"""GPU contracts seen on a CPU: which operations would make the host wait for a GPU, which copies would cross
between them, which dtypes the GEMMs get, and how much memory a region allocates.

On a CPU every tensor lives in host memory, so "this would sync on a GPU" cannot be read off a tensor's device.
:class:`DeviceSim` therefore tracks which tensors *would be on the GPU*: the ones a test marks (model
parameters, the hidden states), everything computed from one of them, everything moved with ``.to(device)`` /
``.cuda()`` from the host, and factories called with an explicit ``device=``. Everything else is a host tensor:
the loader's batches, numpy views, their derivatives. It counts (per label, see :meth:`DeviceSim.region`):

- ``syncs``: what makes the host wait for the device:
  - a scalar read of a device tensor (``aten._local_scalar_dense``: ``.item()``, ``int()``, ``float()``, ``bool()``);
  - ops whose output size depends on device values (``nonzero``, ``masked_select``, ``unique``, boolean-mask
    indexing, ``repeat_interleave`` without ``output_size``, ``bincount``) and ``equal``;
  - a *blocking* host-to-device copy (``.to(device)`` without ``non_blocking=True``, ``torch.tensor(..., device=)``):
    CUDA's copy from pageable memory waits for the stream;
  - every device-to-host copy (``.cpu()``, ``.numpy()``, ``.tolist()`` of a device tensor), also counted in ``d2h``.
- ``gemms``: a :class:`Gemm` (op, operand dtypes and shapes) for every matrix product (``mm``, ``addmm``, ``bmm``,
  ``baddbmm``, ...), device tensors or not.

Reading a host tensor costs no sync on a GPU either, so it is not counted. ``.to(device)`` of a tensor already
on the device is a no-op; on a CPU the same call cannot tell "to the device" from "to the host", so D2H copies are
counted from ``.cpu()``, ``.numpy()`` and ``.tolist()`` only (the forms megamix's code uses).

:func:`peak_allocated` measures the peak of torch's allocated CPU memory over a region (the profiler's memory
events), for memory budgets.
"""
from __future__ import annotations

import collections
import contextlib
import json
import tempfile
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SYNC_OPS = {"_local_scalar_dense", "nonzero", "argwhere", "equal", "masked_select", "is_nonzero", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "nonzero_numpy"}
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "matmul", "dot", "mv", "addmv"}
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "zeros_like", "ones_like",
              "empty_like", "full_like", "tensor", "as_tensor", "linspace", "eye"}
_COPYING_FACTORIES = {"tensor", "as_tensor"}     # host data copied to the device


class Gemm(collections.namedtuple("Gemm", "label op dtypes shapes")):
    """One matrix product seen: its region label, the aten op, and its tensor operands' dtypes and shapes."""

    def touches(self, n: int) -> bool:
        """Whether an operand has a dimension of size ``n`` (e.g. the vocabulary: the LM head's GEMMs)."""
        return any(n in s for s in self.shapes)


class DeviceSim:
    """Track device tensors and count syncs, device-to-host copies and GEMM dtypes (module docstring).

    Use as a context manager around the code under test, after :meth:`mark` of the tensors that live on the
    device; :meth:`region` labels what follows (e.g. ``"micro-step"``, ``"round"``).
    """

    def __init__(self, keep_stacks: bool = True):
        self._dev: dict[int, weakref.ref] = {}
        self.label = "default"
        self.events: list[tuple[str, str, str]] = []     # (label, kind, what)
        self.owners: list[str] = []                      # "megamix" | "third-party" | "test", per event
        self.gemms: list[Gemm] = []
        self.keep_stacks = keep_stacks
        self.stacks: list[str] = []
        self._dispatch = _Dispatch(self)
        self._function = _Function(self)

    # ------------------------------------------------------------------ marking
    def is_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._dev.get(id(t))
        return ref is not None and ref() is t

    def mark(self, *tensors: Any) -> "DeviceSim":
        """Mark tensors (or modules' parameters and buffers, or iterables of tensors) as living on the device."""
        for t in tensors:
            if isinstance(t, torch.nn.Module):
                self.mark(*t.parameters(), *t.buffers())
            elif isinstance(t, torch.Tensor):
                self._add(t)
            elif isinstance(t, (list, tuple)):
                self.mark(*t)
        return self

    def _add(self, t: torch.Tensor) -> None:
        key = id(t)
        try:
            self._dev[key] = weakref.ref(t, lambda _r, k=key, d=self._dev: d.pop(k, None))
        except TypeError:   # not weak-referenceable: not tracked
            pass

    # ------------------------------------------------------------------ counting
    def record(self, kind: str, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "devicesim.py" not in f.filename]
        owner = _owner(frames)
        self.events.append((self.label, kind, what))
        self.owners.append(owner)
        if self.keep_stacks:
            stack = traceback.format_list([f for f in frames if "/torch/" not in f.filename])
            self.stacks.append(f"[{self.label}] {kind} ({owner}): {what}\n" + "".join(stack[-6:]))

    def _select(self, kind: str, label: str | None, owner: str | None):
        return [(lab, k, w) for (lab, k, w), o in zip(self.events, self.owners)
                if k == kind and (label is None or lab == label) and (owner is None or o == owner)]

    def count(self, kind: str = "sync", label: str | None = None, owner: str | None = None) -> int:
        """Events of ``kind`` in region ``label``, optionally only those ``owner`` caused (``megamix``: the innermost
        caller outside torch is megamix's code; ``third-party``: transformers, DeepSpeed, torch.optim, ...)."""
        return len(self._select(kind, label, owner))

    def what(self, kind: str = "sync", label: str | None = None, owner: str | None = None) -> list[str]:
        return [w for _, _, w in self._select(kind, label, owner)]

    def summary(self, label: str | None = None) -> dict[str, collections.Counter]:
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for lab, k, w in self.events:
            if label is None or lab == label:
                out[k][w] += 1
        return dict(out)

    def explain(self, kind: str = "sync", label: str | None = None, limit: int = 6, owner: str | None = None) -> str:
        picked = [s for s in self.stacks if f"] {kind} (" in s and (label is None or s.startswith(f"[{label}]"))
                  and (owner is None or f"({owner})" in s.split("\n")[0])]
        return "\n".join(picked[:limit])

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        old, self.label = self.label, label
        try:
            yield
        finally:
            self.label = old

    def __enter__(self) -> "DeviceSim":
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)


class _Dispatch(TorchDispatchMode):
    def __init__(self, sim: DeviceSim):
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = self.sim
        flat, _ = tree_flatten((args, kwargs))
        on_device = any(sim.is_device(a) for a in flat)
        name = func.overloadpacket.__name__
        if on_device:
            if name in SYNC_OPS:
                sim.record("sync", name)
            elif name in ("index", "index_put", "index_put_") and any(
                    isinstance(a, torch.Tensor) and a.dtype in (torch.bool, torch.uint8) for a in flat[1:]):
                sim.record("sync", f"{name} with a boolean mask")
            elif name == "repeat_interleave" and kwargs.get("output_size") is None and \
                    isinstance(args[0], torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor):
                sim.record("sync", "repeat_interleave without output_size")
        if name in GEMM_OPS:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            sim.gemms.append(Gemm(sim.label, name, tuple(str(a.dtype).replace("torch.", "") for a in ts),
                                  tuple(tuple(a.shape) for a in ts)))
        out = func(*args, **kwargs)
        if on_device:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    sim._add(o)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, sim: DeviceSim):
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = self.sim
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        if name in ("cpu", "numpy", "tolist") and sim.is_device(src):
            sim.record("sync", f".{name}() of a device tensor")
            sim.record("d2h", f".{name}()")
            out = func(*args, **kwargs)
            if out is src:                 # a real copy to the host makes a new tensor, a host tensor from now on
                out = src.clone()
            if isinstance(out, torch.Tensor):
                sim._dev.pop(id(out), None)
            return out
        if name in ("to", "cuda") and isinstance(src, torch.Tensor) and not sim.is_device(src):
            if name == "cuda":
                device, non_blocking = "cuda", bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            else:
                device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None:
                out = func(*args, **kwargs) if name == "to" else src.clone()
                if out is src:
                    out = src.clone()          # a real move makes a new tensor; keep the host original a host tensor
                if not non_blocking:
                    sim.record("sync", "blocking host-to-device copy")
                sim._add(out)
                return out
        if name in _FACTORIES and kwargs.get("device") is not None:
            out = func(*args, **kwargs)
            if name in _COPYING_FACTORIES:
                sim.record("sync", f"torch.{name}(..., device=) copies host data to the device")
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    sim._add(o)
            return out
        return func(*args, **kwargs)


_THIRD_PARTY = ("/transformers/", "/deepspeed/", "/accelerate/", "/torch/", "/megatron/", "/triton/")


def _owner(frames) -> str:
    """Who caused an event: the innermost frame that is megamix's (``megamix``), a library's (``third-party``) or
    the test's own (``test``); torch's frames count as the library's only when nothing else is inside them."""
    for f in reversed(frames):
        path = f.filename
        if "/megamix/" in path or "/kernels/" in path:
            if "/site-packages/" not in path or "megamix" in path.split("/site-packages/")[-1]:
                return "megamix"
        if any(tp in path for tp in _THIRD_PARTY) and "/torch/" not in path:
            return "third-party"
        if "/torch/optim/" in path or "/torch/nn/utils/" in path:
            return "third-party"
    return "test"


def peak_allocated(fn: Callable[[], Any]) -> tuple[int, Any]:
    """``(peak bytes, result)``: the peak of torch's allocated CPU memory while ``fn()`` runs, relative to its start
    (tensors that already existed are not counted), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    if not mem:
        return 0, result
    # The profiler's running total carries over what earlier sessions allocated and freed outside a session:
    # measure from this session's own starting point.
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Total Allocated"] for a in mem) - start, result


__all__ = ["DeviceSim", "Gemm", "peak_allocated", "SYNC_OPS", "GEMM_OPS"]

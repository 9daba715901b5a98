"""What every kernel microbenchmark shares: timing (CUDA events on GPU, perf_counter on CPU), peak memory
(CUDA allocator on GPU, the process's peak RSS on Linux CPUs), the conditions of a run (device, versions and
whether they are the pinned ones, load), and the JSON + CSV writer. ``bench_<op>.py`` files import these so
that their results read alike; where they write and the final table are in :mod:`.output`."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

#: the versions setup.py / requirements pin; results record whether they were measured with them
PINNED = {"torch": "2.13.0", "triton": "3.7.1"}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds per call of ``fn`` (CUDA events on GPU, perf_counter on CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Hand the heap's free pages back to the OS (glibc), so that memory freed by earlier calls is faulted in
    again, and so counted, when the next call needs it."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss_kb() -> int | None:
    """Trim the heap, reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in
    KiB; None where the mark cannot be reset (not Linux, no permission)."""
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")


def peak_rss_kb() -> int | None:
    """The process's peak RSS (KiB) since the last :func:`reset_peak_rss_kb` (``VmHWM``)."""
    return _proc_status_kb("VmHWM")


def peak_mb(fn, dev: torch.device) -> float:
    """Peak memory (MB) ``fn`` needs above what was in use before it: on CUDA the allocator's peak; on a Linux
    CPU the rise of the process's peak RSS after trimming the heap (memory an allocator still keeps from earlier
    calls is not counted, so it is a lower bound); NaN where neither can be read."""
    if dev.type != "cuda":
        base = reset_peak_rss_kb()
        if base is None:
            return float("nan")
        fn()
        peak = peak_rss_kb()
        return float("nan") if peak is None else max(peak - base, 0) / 1024
    sync(dev)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def env_info(dev: torch.device) -> dict:
    """Date, host, device, python/torch/triton/CUDA versions (and whether they match the pins), CPU load."""
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(dev),
            "host": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["pinned"] = dict(PINNED)
    info["matches_pins"] = (str(info["torch"]).split("+")[0] == PINNED["torch"] and info["triton"] == PINNED["triton"])
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    info["loadavg_1m_at_start"] = os.getloadavg()[0]  # other processes sharing the cores skew timings
    return info


def write_json_csv(out_dir: Path, tag: str, meta: dict, rows: list[dict], extra: dict,
                   keys: list[str]) -> tuple[Path, Path]:
    """``<tag>.json`` (meta, rows and ``extra``) and ``<tag>.csv`` (``keys`` + device and versions per row),
    each written to a temporary name and renamed, so an interrupted run never leaves a torn file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, cp = out_dir / f"{tag}.json", out_dir / f"{tag}.csv"
    tmp = jp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=1))
    os.replace(tmp, jp)
    tmp = cp.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys + ["gpu", "torch", "triton", "date"], extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "gpu": meta.get("gpu", meta.get("cpu")), "torch": meta["torch"],
                         "triton": meta["triton"], "date": meta["date"]})
    os.replace(tmp, cp)
    return jp, cp

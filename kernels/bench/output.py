"""Where a benchmark writes and how it ends: the run folder and the readable table. Shared by the kernel
microbenchmarks here and the scripts in ``benchmarks/``; free of torch so that ``megamix --help`` stays fast.

The rule every benchmark follows: results go to the folder the user names (``--out``), by default a fresh run
folder ``runs/bench/<name>-<UTC time>/`` (``runs/`` is git-ignored). The committed results
(``kernels/bench/results/``, ``benchmarks/results/``) are refreshed only when that folder is named on purpose.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

#: parent of the default run folders, relative to the current directory (git-ignored with ``/runs/``)
RUNS_ROOT = "runs/bench"


def default_out_dir(name: str, root: str = RUNS_ROOT) -> str:
    """``runs/bench/<name>-<UTC YYYYmmddTHHMMSS>`` (``-2``, ``-3``, ... if that folder already exists).
    Only the name is computed: the benchmark creates the folder when it writes."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = Path(root) / f"{name}-{stamp}"
    i = 2
    while path.exists():
        path = Path(root) / f"{name}-{stamp}-{i}"
        i += 1
    return str(path)


def fmt(value, spec: str = ".2f", none: str = "—") -> str:
    """``value`` formatted with ``spec``; ``none`` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def md_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A Markdown table with aligned columns (readable in a terminal, pasteable in a README). Columns in
    ``right`` (default: all but the first) are right-aligned."""
    right = set(range(1, len(header))) if right is None else right
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(header[j])] + [len(r[j]) for r in cells]) for j in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if j in right else c.ljust(w)
                                 for j, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if j in right else ("-" * (w + 2))
                         for j, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in cells])


def conditions_line(meta: dict) -> str:
    """One line of the run's conditions from :func:`megamix.kernels.bench.common.env_info`'s dict."""
    dev = meta.get("gpu") or f"{meta.get('cpu') or 'cpu'}, {meta.get('threads', '?')} threads"
    pins = "the pinned versions" if meta.get("matches_pins") else f"not the pins {meta.get('pinned')}"
    parts = [f"device: {dev}", f"torch {meta.get('torch')}, triton {meta.get('triton')} ({pins})"]
    if meta.get("loadavg_1m_at_start") is not None:
        parts.append(f"load {meta['loadavg_1m_at_start']:.1f} at start")
    if meta.get("iters") is not None:
        parts.append(f"median of {meta['iters']} after {meta.get('warmup', 0)} warm-up")
    parts.append(meta.get("date", ""))
    return "; ".join(p for p in parts if p)

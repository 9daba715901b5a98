"""Save/load a :class:`StatsSnapshot` as ``.npz`` (for ``megamix mix simulate`` and debugging).

Keys: ``step``, ``domain_names`` (unicode array), ``counts``, ``sums``, ``gram``, ``domain_loss`` and,
when present, ``per_sample``, ``per_sample_domain``, ``eval_sums``. Numeric array entries of
``extra`` are stored as ``extra__<name>`` (e.g. ``extra__eval_counts``, ``extra__per_sample_loss``).
Only ``counts`` and ``sums`` are required when loading; ``gram`` defaults to ``sums @ sums.T`` and
``domain_names`` to ``d0, d1, ...``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megamix.snapshot import StatsSnapshot

__all__ = ["save_snapshot_npz", "load_snapshot_npz"]

_OPTIONAL = ("per_sample", "per_sample_domain", "eval_sums")


def save_snapshot_npz(snap: StatsSnapshot, path: str | Path) -> Path:
    """Write ``snap`` to ``path`` (``.npz`` appended when missing) atomically; non-array ``extra`` entries are
    dropped. Returns the path written."""
    arrays = {"step": np.asarray(snap.step), "domain_names": np.asarray(snap.domain_names, dtype=str),
              "counts": snap.counts, "sums": snap.sums, "gram": snap.gram,
              "domain_loss": snap.domain_loss}
    for k in _OPTIONAL:
        v = getattr(snap, k)
        if v is not None:
            arrays[k] = v
    for k, v in snap.extra.items():
        if isinstance(v, (np.ndarray, list, tuple)):
            arrays[f"extra__{k}"] = np.asarray(v)
    p = Path(path)
    if p.suffix != ".npz":  # numpy's own rule for savez
        p = p.with_name(p.name + ".npz")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, p)  # atomic: a reader never sees a partial file
    return p


def load_snapshot_npz(path: str | Path) -> StatsSnapshot:
    """Read a snapshot written by :func:`save_snapshot_npz` (or any npz with counts and sums)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"snapshot file {p} not found")
    with np.load(p, allow_pickle=False) as z:
        keys = set(z.files)
        for req in ("counts", "sums"):
            if req not in keys:
                raise ValueError(f"{p}: a snapshot npz needs '{req}' (has {sorted(keys)})")
        counts = np.asarray(z["counts"], np.float64)
        sums = np.asarray(z["sums"], np.float64)
        if sums.ndim != 2 or counts.shape != (sums.shape[0],):
            raise ValueError(f"{p}: counts {counts.shape} and sums {sums.shape} do not match")
        d = len(counts)
        names = [str(x) for x in z["domain_names"]] if "domain_names" in keys else [f"d{i}" for i in range(d)]
        extra = {k[len("extra__"):]: np.asarray(z[k]) for k in keys if k.startswith("extra__")}
        return StatsSnapshot(
            step=int(z["step"]) if "step" in keys else 0, domain_names=names, counts=counts, sums=sums,
            gram=np.asarray(z["gram"], np.float64) if "gram" in keys else sums @ sums.T,
            domain_loss=np.asarray(z["domain_loss"], np.float64) if "domain_loss" in keys
            else np.full(d, np.nan),
            per_sample=np.asarray(z["per_sample"], np.float64) if "per_sample" in keys else None,
            per_sample_domain=np.asarray(z["per_sample_domain"], np.int64)
            if "per_sample_domain" in keys else None,
            eval_sums=np.asarray(z["eval_sums"], np.float64) if "eval_sums" in keys else None,
            extra=extra)

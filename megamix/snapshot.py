"""The statistics a mixing strategy sees at each update, and everything done with them: the snapshot class,
merging rounds, JSON (strategy state in checkpoints) and ``.npz`` files (``megamix mix simulate``, the run's
``snapshots/``).

The ``.npz`` keys: ``step``, ``domain_names`` (unicode array), ``counts``, ``sums``, ``gram``, ``domain_loss``
and, when present, ``per_sample``, ``per_sample_domain``, ``eval_sums``. Numeric array entries of ``extra`` are
stored as ``extra__<name>`` (e.g. ``extra__eval_counts``, ``extra__per_sample_loss``). Only ``counts`` and
``sums`` are required when loading; ``gram`` defaults to ``sums @ sums.T`` and ``domain_names`` to ``d0, d1, ...``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from megamix.io import atomic_open

__all__ = ["StatsSnapshot", "merge_snapshots", "snapshot_to_dict", "snapshot_from_dict", "save_snapshot_npz",
           "load_snapshot_npz", "PER_ROW_EXTRAS"]


@dataclass
class StatsSnapshot:
    """Per-domain gradient statistics accumulated over one round of K optimizer steps.

    All arrays are numpy and identical on every rank (they come from all-reduced accumulators).
    ``k`` is the projected gradient dimension (k1*k2, or the second-stage k).
    """

    step: int
    domain_names: list[str]
    counts: np.ndarray                      # [D] samples seen this round per domain
    sums: np.ndarray                        # [D, k] Σ g_i over this round's samples of each domain
    gram: np.ndarray                        # [D, D] sums @ sums.T
    domain_loss: np.ndarray                 # [D] mean train token loss this round (nan if unseen)
    per_sample: np.ndarray | None = None    # [n, k] projected per-sample gradients of this round
    per_sample_domain: np.ndarray | None = None  # [n] domain index of each row of per_sample
    eval_sums: np.ndarray | None = None     # [E, k] held-out gradient sums (optional)
    extra: dict = field(default_factory=dict)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def means(self) -> np.ndarray:
        """[D, k] mean projected gradient per domain (zero rows for unseen domains)."""
        c = np.maximum(self.counts.astype(np.float64), 1.0)[:, None]
        return self.sums / c


#: ``snapshot.extra`` entries with one value per ``per_sample`` row
PER_ROW_EXTRAS = ("per_sample_ids", "per_sample_loss")


def merge_snapshots(a: StatsSnapshot, b: StatsSnapshot) -> StatsSnapshot:
    """Combine two rounds (b later than a): counts and sums add, per-sample rows (and their
    :data:`PER_ROW_EXTRAS`) concatenate, and the
    held-out eval sums add together with their ``extra["eval_counts"]`` (so eval means stay means)."""
    if a.domain_names != b.domain_names:
        raise ValueError("cannot merge snapshots over different domains")
    counts = a.counts + b.counts
    sums = a.sums + b.sums
    with np.errstate(invalid="ignore"):
        tot = a.counts * np.nan_to_num(a.domain_loss) + b.counts * np.nan_to_num(b.domain_loss)
        loss = np.where(counts > 0, tot / np.maximum(counts, 1), np.nan)
    per_sample = per_dom = None
    if a.per_sample is not None and b.per_sample is not None:
        per_sample = np.concatenate([a.per_sample, b.per_sample])
        per_dom = np.concatenate([a.per_sample_domain, b.per_sample_domain])
    extra = dict(a.extra)
    extra.update(b.extra)
    for key in PER_ROW_EXTRAS:  # one entry per per-sample row: concatenate with the rows
        if key in a.extra or key in b.extra:
            extra.pop(key)
            if per_sample is not None and key in a.extra and key in b.extra:
                extra[key] = np.concatenate([np.asarray(a.extra[key]), np.asarray(b.extra[key])])
    ev = a.eval_sums if b.eval_sums is None else b.eval_sums
    if a.eval_sums is not None and b.eval_sums is not None:
        ev = a.eval_sums + b.eval_sums
        ca, cb = a.extra.get("eval_counts"), b.extra.get("eval_counts")
        if (ca is None) != (cb is None):
            raise ValueError("cannot merge eval sums when only one snapshot has extra['eval_counts']")
        if ca is not None:
            extra["eval_counts"] = np.asarray(ca, np.float64) + np.asarray(cb, np.float64)
    elif a.eval_sums is not None and "eval_counts" in a.extra:
        extra["eval_counts"] = a.extra["eval_counts"]  # b had no eval pass: keep a's means intact
    return StatsSnapshot(step=b.step, domain_names=list(b.domain_names), counts=counts, sums=sums,
                         gram=sums @ sums.T, domain_loss=loss, per_sample=per_sample,
                         per_sample_domain=per_dom, eval_sums=ev, extra=extra)


def to_jsonable(v: Any) -> Any:
    """``v`` with numpy arrays and scalars made JSON-serialisable (arrays become tagged lists)."""
    if isinstance(v, np.ndarray):
        return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    return v


def from_jsonable(v: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(v, dict) and "__ndarray__" in v:
        return np.asarray(v["__ndarray__"], dtype=v["dtype"])
    if isinstance(v, dict):
        return {k: from_jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_jsonable(x) for x in v]
    return v


def snapshot_to_dict(s: StatsSnapshot) -> dict:
    """A JSON-serialisable dict (numpy arrays become tagged lists)."""
    return {f.name: to_jsonable(getattr(s, f.name)) for f in fields(s)}


def snapshot_from_dict(d: dict) -> StatsSnapshot:
    """Inverse of :func:`snapshot_to_dict`."""
    return StatsSnapshot(**{k: from_jsonable(v) for k, v in d.items()})


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
    with atomic_open(p, "wb") as f:   # a reader never sees a partial file
        np.savez(f, **arrays)
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

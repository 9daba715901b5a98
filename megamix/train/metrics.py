"""Run telemetry, written by rank 0 only: ``metrics.jsonl`` (always), TensorBoard (when installed and
``logging.tensorboard``), Weights & Biases (``logging.wandb``) and the statistics snapshot of every mixing
round (``<out_dir>/snapshots/``).

One record per event: ``{"kind", "step", "time", ...values}``. The same scalars reach TensorBoard and W&B
under one tag scheme (:func:`scalar_tags`): ``<kind>/<key>`` for a number, ``<kind>/<key>/<name>`` for a
dict of numbers, and ``<kind>/<name>`` when the key repeats the kind (``weights/code_python``, not
``weights/weights/code_python``).

On resume from step ``s`` the loop truncates ``metrics.jsonl`` to the records with ``step <= s``;
TensorBoard hides the earlier run's events after ``s`` (``purge_step``), and snapshots after ``s`` are
deleted, so nothing is reported twice. W&B continues the same run (its id is kept in
``<out_dir>/wandb_run_id``); the steps between the checkpoint and the interruption are logged again there.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from megamix.integrations.wandb import WandbRun
from megamix.io import atomic_path, read_jsonl
from megamix.snapshot import save_snapshot_npz

SNAPSHOT_DIR = "snapshots"
LATEST_SNAPSHOT = "latest.npz"
_SNAP_RE = re.compile(r"^step_(\d{7,})\.npz$")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scalar_tags(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The finite scalars of one record as ``{tag: value}`` (the TensorBoard / W&B tags; see the module
    docstring). Lists (the Gram matrix, domain names) are left out."""
    out: dict[str, float] = {}
    for k, v in values.items():
        prefix = kind if k == kind else f"{kind}/{k}"
        if isinstance(v, dict):
            for kk, vv in v.items():
                if _number(vv):
                    out[f"{prefix}/{kk}"] = float(vv)
        elif _number(v):
            out[prefix] = float(v)
    return out


def mixture_fields(report: dict) -> dict[str, Any]:
    """Per-domain mixture telemetry for a ``train`` record, from ``MixtureLoader.telemetry()``.

    ``realised_share`` / ``target_share``: cumulative shares of trained samples (= tokens) drawn vs asked
    for since step 0; ``realised_share_window``: over the last ``loader.telemetry_window`` steps;
    ``tokens``: trained tokens per domain; ``epochs``: passes over each domain's training split;
    ``max_share_error``: the largest |realised - target| cumulative share. The loader counts the whole
    global batch on every rank, so under DDP/DeepSpeed these are totals over all ranks."""
    per = report.get("domains", {})
    pick = lambda key: {d: v[key] for d, v in per.items()}  # noqa: E731
    return {"realised_share": pick("realised_share_cumulative"), "target_share": pick("target_share_cumulative"),
            "realised_share_window": pick("realised_share_window"), "tokens": pick("tokens_seen"),
            "epochs": pick("epochs_completed"), "max_share_error": report.get("max_abs_share_error_cumulative")}


class SnapshotArchive:
    """The :class:`~megamix.snapshot.StatsSnapshot` of each mixing round as ``.npz`` under
    ``<out_dir>/snapshots/``: ``step_XXXXXXX.npz`` for the newest ``keep`` rounds, and ``latest.npz`` (a
    hard link to the newest, or a copy where links are not supported). Each file is written atomically;
    ``megamix mix simulate --snapshot <file>`` replays a strategy on them. ``keep=0`` writes nothing."""

    def __init__(self, out_dir: str | Path, keep: int, resume_step: int = 0):
        self.dir = Path(out_dir) / SNAPSHOT_DIR
        self.keep = int(keep)
        if self.dir.is_dir():   # a resumed (or restarted) run: rounds after the checkpoint will come again
            stale = [p for s, p in self._files() if s > resume_step]
            for p in stale:
                p.unlink(missing_ok=True)
            if stale or resume_step == 0:
                self._relink()

    def _files(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        out = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _SNAP_RE.match(p.name))]
        return sorted(out)

    def _relink(self) -> None:
        files = self._files()
        latest = self.dir / LATEST_SNAPSHOT
        if not files:
            latest.unlink(missing_ok=True)
            return
        with atomic_path(latest) as tmp:
            tmp.unlink(missing_ok=True)
            try:
                os.link(files[-1][1], tmp)
            except OSError:
                import shutil
                shutil.copyfile(files[-1][1], tmp)

    def save(self, snap) -> Path | None:
        if self.keep <= 0:
            return None
        path = save_snapshot_npz(snap, self.dir / f"step_{int(snap.step):07d}.npz")
        for _, old in self._files()[:-self.keep]:
            old.unlink(missing_ok=True)
        self._relink()
        return path


class MetricsLogger:
    """Appends one JSON object per event to ``metrics.jsonl`` and mirrors its scalars to TensorBoard and W&B.

    Args:
        out_dir: the run directory.
        enabled: False on every rank but 0 (all calls are then no-ops).
        tensorboard: mirror to ``<out_dir>/tensorboard`` when the package is installed.
        resume_step: the step the run resumed from (0 = fresh): TensorBoard hides the events an earlier run in
            ``out_dir`` logged after it, and later snapshots are deleted.
        logging: a :class:`megamix.config.LoggingConfig` (W&B and snapshot settings); None = defaults.
        run_config: the run's config as a dict (W&B's run config).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, *,
                 resume_step: int = 0, logging: Any = None, run_config: dict | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._snapshots = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if logging is not None:
            tensorboard = tensorboard and logging.tensorboard
            self._snapshots = SnapshotArchive(self.out_dir, logging.snapshots, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # hide what an earlier run in this out_dir logged after the resume point (everything on a
                # fresh start), as metrics.jsonl is cut back
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else 0)
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None
        if logging is not None and logging.wandb:
            self._wandb = WandbRun(self.out_dir, logging, run_config or {}, resume=resume_step > 0)

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time()}
        rec.update({k: _clean(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tags = scalar_tags(kind, values)
        if self._tb is not None:
            for tag, v in tags.items():
                self._tb.add_scalar(tag, v, step)
        if self._wandb is not None and tags:
            self._wandb.log(tags, step)

    def snapshot(self, snap) -> Path | None:
        """Archive the statistics snapshot of a mixing round (see :class:`SnapshotArchive`)."""
        if not self.enabled or self._snapshots is None:
            return None
        return self._snapshots.save(snap)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (a line that is not JSON is a ``ValueError`` naming it)."""
    return read_jsonl(path)

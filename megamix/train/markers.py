"""What a checkpoint's completion markers record beyond file sizes: checksums, and the run it belongs to.

**Checksums.** A completion marker (``megamix_rankNNNNN.done.json``, :mod:`megamix.train.checkpoint`) lists every
file its rank relies on with its size, and under ``checksums`` the checksum (``"crc32:1a2b3c4d"``) of a share of
them, computed by reading each file once right after it was written (the page cache still holds it): the
model/engine files are split over the ranks by size (:func:`share`, so each is read by one rank only), and each
rank adds its own side file (rank 0 also the config copy). Together the markers cover every file once. A resume
verifies every recorded checksum before it restores anything (rank 0, a few files in parallel: :func:`verify`),
so a file garbled in place at its old size (a bad disk block, a copy gone wrong) makes that checkpoint incomplete
(``<file> does not match its checksum (corrupted)``) and the resume falls back to the previous complete one, as
for a truncated file. Markers written before checksums existed have none: only their sizes are checked. CRC-32 is
chosen for speed (``benchmarks/checkpoint_checksum.py`` measures it): it guards against corruption, not tampering;
a marker may name any :mod:`hashlib` algorithm instead (``"sha256:..."``), and one this megamix does not know is
not verified.

**Run identity.** Every training run in a ``train.out_dir`` has a run id (:func:`new_run_id`, created when the run
starts at step 0), kept in ``<out_dir>/run.json`` (:data:`RUN_FILE`, written atomically) and recorded in each of
its checkpoints' side files and markers (``run_id``). A resume continues the run ``run.json`` names, and a
checkpoint whose markers carry another run id is never resumed from (:class:`~megamix.train.checkpoint.Checkpoints`
skips it, with the reason, like an incomplete one). Checkpoints written before run ids existed carry none: they
are taken to belong to the run (the one-run-per-folder rule that comes with run ids did not exist then either).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from megamix.io import atomic_write_json

log = logging.getLogger("megamix")

#: the checksum the markers record (zlib's CRC-32: the fastest the standard library has)
ALGO = "crc32"
#: read size while hashing
CHUNK = 8 << 20
#: the run identity file in ``train.out_dir``
RUN_FILE = "run.json"


# --------------------------------------------------------------------------------------------- checksums
def file_checksum(path: str | os.PathLike, algo: str = ALGO) -> str:
    """``"<algo>:<hex>"`` of the file at ``path``, streamed in :data:`CHUNK` pieces (``crc32`` or a
    :mod:`hashlib` name). Both release the GIL while hashing, so threads hash several files at once."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    crc, h = 0, None if algo == "crc32" else hashlib.new(algo)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if h is None:
                crc = zlib.crc32(view[:n], crc)
            else:
                h.update(view[:n])
    return f"{algo}:{crc:08x}" if h is None else f"{algo}:{h.hexdigest()}"


def known(algo: str) -> bool:
    """Whether this megamix can verify a checksum of algorithm ``algo``."""
    return algo == "crc32" or algo in hashlib.algorithms_available


def _threads(n: int) -> int:
    return max(1, min(8, n, os.cpu_count() or 1))


def checksums(d: Path, names: Iterable[str], algo: str = ALGO) -> dict[str, str]:
    """``{name: checksum}`` of the files ``d / name`` (a few in parallel)."""
    names = sorted(set(names))
    with ThreadPoolExecutor(_threads(len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: file_checksum(d / n, algo), names)))


def share(files: dict[str, int], rank: int, world: int) -> list[str]:
    """The files of ``files`` (``{name: size}``) that rank ``rank`` of ``world`` hashes: the largest first, each to
    the rank with the fewest bytes so far (ties: the lowest rank). Every rank computes the same split."""
    load = [0] * max(world, 1)
    mine = []
    for name, size in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(len(load)), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(name)
    return mine


def verify(d: Path, expected: dict[str, str]) -> str | None:
    """Why the files under ``d`` do not match the checksums ``expected`` (``{name: "algo:hex"}``), or None when
    they all do. The first mismatch in name order is reported; a checksum of an unknown algorithm is skipped."""
    todo = {n: c for n, c in expected.items() if known(c.split(":", 1)[0])}

    def one(name: str) -> str | None:
        f = d / name
        if not f.is_file():
            return f"{f} is missing"
        try:
            got = file_checksum(f, todo[name].split(":", 1)[0])
        except OSError as e:
            return f"{f} cannot be read ({e.strerror or type(e).__name__})"
        return None if got == todo[name] else f"{f} does not match its checksum (corrupted)"

    names = sorted(todo)
    with ThreadPoolExecutor(_threads(len(names))) as pool:
        return next((why for why in pool.map(one, names) if why is not None), None)


# --------------------------------------------------------------------------------------------- run identity
def new_run_id() -> str:
    return uuid.uuid4().hex


def read_run_id(out_dir: str | os.PathLike) -> str | None:
    """The run id ``<out_dir>/run.json`` records; None when there is no such file. Raises ``ValueError`` naming
    the file when it cannot be read or holds no run id."""
    p = Path(out_dir) / RUN_FILE
    if not p.is_file():
        return None
    try:
        rid = json.loads(p.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p} cannot be read ({type(e).__name__})") from None
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"{p} holds no run id")
    return rid


def write_run_id(out_dir: str | os.PathLike, run_id: str) -> Path:
    """Record ``run_id`` as the run of ``out_dir`` (atomically); returns the file."""
    return atomic_write_json(Path(out_dir) / RUN_FILE, {
        "run_id": run_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def recorded_run_id(out_dir: str | os.PathLike) -> str | None:
    """:func:`read_run_id`, None when ``run.json`` cannot be read."""
    try:
        return read_run_id(out_dir)
    except ValueError:
        return None


def run_id_of(d: Path) -> str | None:
    """The run id the markers of checkpoint directory ``d`` record (None: none does, or none can be read)."""
    for m in sorted(d.glob("megamix_rank*.done.json")):
        try:
            rid = json.loads(m.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(rid, str) and rid:
            return rid
    return None


def continued_run(out_dir: str | os.PathLike, checkpoints: list[Path]) -> str | None:
    """The run a resume in ``out_dir`` continues: the one ``run.json`` records; without one (a folder from before
    run ids, or an unreadable ``run.json``: said in one line), that of the first of ``checkpoints`` (directories,
    the one a resume tries first first) recording one; None when none does."""
    try:
        return read_run_id(out_dir) or next((r for d in checkpoints if (r := run_id_of(d))), None)
    except ValueError as e:
        d, rid = next(((d, r) for d in checkpoints if (r := run_id_of(d))), (None, None))
        log.warning("megamix: %s; %s", e, f"continuing run {rid} of checkpoint {d}" if rid
                    else "no checkpoint records a run id: this run gets a new one")
        return rid


#: an earlier run's files in ``train.out_dir`` that ``--overwrite`` deletes with its checkpoints (the new run
#: rewrites config.yaml and data_manifest.json; ds_config.json is already the new run's)
RUN_FILES = ("metrics.jsonl", "result.json", "curves.png", "gram.png", "wandb_run_id", "snapshots", "tensorboard",
             RUN_FILE)


def delete_run(out_dir: str | os.PathLike, root: Path) -> list[str]:
    """Delete the checkpoints under ``root`` and the :data:`RUN_FILES` of ``out_dir`` (``--overwrite``); returns
    the names deleted and says so in one line. A folder is first renamed to ``.deleting_<name>_<pid>`` (at once),
    then deleted (slowly): a kill during the delete leaves no torn checkpoint that could look complete, and the
    next run removes the rest (:meth:`~megamix.train.checkpoint.Checkpoints.claim`)."""
    out_dir = Path(out_dir)
    n = sum(1 for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else 0
    gone = [p for p in (root, *(out_dir / name for name in RUN_FILES)) if p.exists() or p.is_symlink()]
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            trash = p.with_name(f".deleting_{p.name}_{os.getpid()}")
            os.replace(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            p.unlink()
    names = [f"{p.name}/ ({n} checkpoint{'s' * (n != 1)})" if p == root else p.name for p in gone]
    if names:
        log.warning("megamix: --overwrite: deleted %s in %s", ", ".join(names), out_dir)
    return names


__all__ = ["ALGO", "RUN_FILE", "file_checksum", "checksums", "share", "verify", "known", "new_run_id",
           "read_run_id", "write_run_id", "recorded_run_id", "run_id_of", "continued_run", "RUN_FILES", "delete_run"]

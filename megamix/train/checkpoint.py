"""The one checkpoint layout of the training loop, for every backend, and how a run resumes from it::

    <train.out_dir>/checkpoints/
        latest                        tag of the newest complete checkpoint (rank 0 writes it last, atomically)
        step_0000006/
            <model files>             plain backend: model.pt (model + optimizer state); DeepSpeed: what
                                      engine.save_checkpoint(..., tag, save_latest=False) writes
            megamix_rank00000.pt      per rank: step, mixer state (loader, strategy, round accumulators),
                                      torch RNG, world size, backend name, the run config
            config.yaml               the run config of this checkpoint (rank 0), for people and diffs
            megamix_rank00000.done.json  per rank, written last: the files this rank relies on, with sizes,
                                      checksums of its share of them, and the run id
    <train.out_dir>/run.json          the run id of the run this folder belongs to (megamix.train.markers)

**Crash consistency.** A save (collective) goes: every rank removes its old completion marker of this tag,
barrier; the backend writes the model/engine files, barrier; each rank writes its side file, then its
completion marker (``.done.json``: world size, step, run id, every file of the checkpoint it relies on with its
size, and the checksums of its share of them: :mod:`megamix.train.markers`), barrier; then rank 0 atomically
rewrites ``latest``. A checkpoint is *complete* when every rank's marker is there and every file a marker lists
has the recorded size (and, when a resume verifies them, the recorded checksum), so a process killed at any
point (even between DeepSpeed's files and megamix's) leaves either a complete checkpoint or one that is
recognisably incomplete. DeepSpeed's own ``latest`` is never written nor read for this layout: megamix passes
the tag.

**Resume** (:meth:`Checkpoints.load`) takes the checkpoint ``latest`` names if it is complete and readable,
else the newest complete and readable one, and says so in one warning line naming what was incomplete or
which file could not be read. A truncated file, or one garbled in place at its old size (its checksum, which
rank 0 verifies, differs: ``<file> does not match its checksum (corrupted)``), is found before anything is
restored, on every backend; markers from before checksums carry none and are checked by size only. A checkpoint
whose markers record another run id than this run's is skipped likewise (see *One run per folder*). Every
rank takes the same decision (one all-reduce per candidate looked at). The checkpoint's config is compared with
the run's: a field that differs must be one that may change (:data:`megamix.config.RESUME_FREE`, or listed in
``train.resume_allow_changes``), else a :class:`ConfigError` lists the differences, one line per field.

**Another world size.** A backend with a ``resize_note`` method resumes a checkpoint written by a different
number of ranks: each new rank reads the old ranks' side files it needs and merges them
(:mod:`megamix.train.elastic`: loader and strategy state of old rank 0, the round's statistics summed onto the new
rank 0, random state of old rank r or 0), the global batch size must be the checkpoint's (one line otherwise,
before the backend converts anything), rank 0 says so in one line naming both world sizes and how the backend
restores its state (DeepSpeed: a universal checkpoint in ``step_XXXXXXX/universal``; plain and DDP: every rank
loads the one unsharded ``model.pt``, and as both write the same file each resumes the other's: a DDP run resumed
by one process runs the plain backend). Other backends refuse in one line.

**Retention** (``train.keep_checkpoints``): once a new checkpoint is complete and ``latest`` names it, rank
0 deletes complete checkpoints *older* than it beyond the newest N. Incomplete ones, newer ones and the one
``latest`` names are never deleted.

**One run per folder** (:meth:`Checkpoints.claim`, at the start of every run). A new run
(``train.resume=false``) refuses a ``train.out_dir`` that holds checkpoints (one line: pass ``--overwrite`` to
delete them with that run's metrics and results, or set a new ``train.out_dir``); ``--overwrite`` always starts a
new run (``train.resume`` is then moot). A new run gets a new run id in ``run.json``; a resume keeps the one there
(without ``run.json``, a folder from before run ids: that of the newest checkpoint recording one, else a new one).
Checkpoints written before run ids record none and are taken to belong to the run.

Checkpoints must be on storage every rank sees (as DeepSpeed's default checkpointing assumes).

Test hook: ``Checkpoints(out_dir, on_phase=f)`` calls ``f(phase, step, rank)`` at each point of
:data:`PHASES` during a save (``train(checkpoint_hook=f)`` passes it; the kill tests' launcher
``tests/killpoint.py`` uses it to SIGKILL a run at a named point).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from megamix.config import flat_config, resume_change_kind
from megamix.configbase import ConfigError
from megamix import comm
from megamix.io import atomic_path, atomic_write_json, atomic_write_text
from megamix.train import elastic
from megamix.train import markers as mk
from megamix.train.guard import NonFiniteError

log = logging.getLogger("megamix")

SIDE_FILE = "megamix_rank{rank:05d}.pt"
DONE_FILE = "megamix_rank{rank:05d}.done.json"
CONFIG_COPY = "config.yaml"
#: layout version in side files and markers; from 2 on, a checkpoint is complete only with every marker
FORMAT = 2
LATEST = "latest"
#: points of a save where ``on_phase`` is called, in order
PHASES = ("model_saved", "side_saved", "marker_saved", "latest_saved")
_OWN = re.compile(r"megamix_rank(\d+)\.(pt|done\.json)$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _step_of(name: str) -> int | None:
    """The step a checkpoint directory's name encodes (``step_0000006``: :func:`tag_for`), else None."""
    m = re.fullmatch(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random-number state: the CPU generator and, when CUDA is present, the generator of this
    rank's own GPU (``device``, else the current one); ``cuda_rng`` is None on a machine without CUDA, which a
    resume then notes. Each rank saves its own (dropout and any sampling on the GPU draw from it)."""
    cuda = None
    if torch.cuda.is_available():
        dev = device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        cuda = torch.cuda.get_rng_state(dev)
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def restore_rng(side: dict, device: torch.device | None = None, *, where: Any = "", main: bool = True) -> None:
    """Restore what :func:`rng_state` saved, on this rank's own GPU; say in one line (rank 0) when the CUDA state
    cannot be restored exactly (saved without CUDA and resumed with it, or the other way round)."""
    torch.set_rng_state(side["torch_rng"])
    saved = side.get("cuda_rng")
    if torch.cuda.is_available():
        if saved is not None:
            dev = device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_rng_state(saved, dev)
        elif main:
            log.warning("megamix: checkpoint %s holds no CUDA random state (written without CUDA); the GPU's generator "
                        "starts from train.seed, so dropout on the GPU will differ from an uninterrupted run", where)
    elif saved is not None and main:
        log.warning("megamix: checkpoint %s holds CUDA random states but this run has no CUDA device; they are not "
                    "restored", where)


class _Unreadable(Exception):
    """A file of a checkpoint is missing or cannot be read (the message names it)."""


def _read_torch(path: Path) -> Any:
    if not path.is_file():
        raise _Unreadable(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, I/O error: all mean "not this checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _Unreadable(f"{path} cannot be read ({type(e).__name__}: {first[:160]})") from None


def _fmt(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_resume_config(saved: dict | None, cfg: Any, where: Path, allow: list[str] | None = None,
                        main: bool = True) -> list[str]:
    """Compare the checkpoint's config (``saved``, a ``to_dict()``) with the run's ``cfg``.

    Returns the allowed changes (one ``field: old -> new`` string each; rank 0 logs them in one line). Raises
    :class:`ConfigError` listing every difference, one line per field, when any field differs that may not
    change: fields in :data:`megamix.config.RESUME_NEVER` never may, other fields only when listed in
    ``train.resume_allow_changes`` (``allow``; default: the run's), :data:`~megamix.config.RESUME_FREE` always
    may. Fields one of the two configs lacks (a newer or older megamix) are not compared."""
    if not saved:
        return []
    allow = set(cfg.train.resume_allow_changes if allow is None else allow)
    old, new = flat_config(saved), flat_config(cfg.to_dict())
    allowed, blocked, never = [], [], False
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key]:
            continue
        line = f"{key}: {_fmt(old[key])} (checkpoint) -> {_fmt(new[key])} (now)"
        kind = resume_change_kind(key)
        if kind == "free" or (kind == "override" and key in allow):
            allowed.append(line)
        elif kind == "never":
            never = True
            blocked.append(f"  {line}  [cannot change on resume]")
        else:
            blocked.append(f"  {line}  [add it to train.resume_allow_changes to allow]")
    if blocked:
        may = [b.split(":")[0].strip() for b in blocked if "resume_allow_changes" in b]
        fix = "start a new train.out_dir"
        if may and not never:
            fix += (" or, to continue this run with the new values, pass --set "
                    f"train.resume_allow_changes=[{','.join(sorted(allow | set(may)))}]")
        elif may:
            fix += " (the fields marked 'cannot change' shape the saved state)"
        raise ConfigError(f"the config differs from the one checkpoint {where} was written with:\n"
                          + "\n".join(blocked) + f"\n{fix}")
    if main and allowed:
        log.warning("megamix: resuming with a changed config: %s", "; ".join(allowed))
    return allowed


class Checkpoints:
    """Save and restore training state under ``<out_dir>/checkpoints`` (see the module docstring).

    Args:
        out_dir: the run directory (``train.out_dir``).
        on_phase: optional ``f(phase, step, rank)`` called at each point of :data:`PHASES` of a save.
    """

    def __init__(self, out_dir: str | Path, on_phase: Callable[[str, int, int], None] | None = None):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoints"
        self.on_phase = on_phase
        self.loaded: Path | None = None   # the checkpoint the last load() restored
        self.saved: Path | None = None    # the checkpoint the last save() completed
        self.run_id: str | None = None    # this run's id (claim()); None: checkpoints of any run are taken

    #: record checksums in the markers (save) and verify them (load); off only to measure what they cost
    checksums = True

    # ------------------------------------------------------------------------------------- reading
    def latest_tag(self) -> str | None:
        """The tag ``latest`` names, if it names an existing checkpoint (complete or not)."""
        root = self.root
        p = root / LATEST
        if not p.is_file():
            return None
        tag = p.read_text().strip()
        return tag if tag and (root / tag).exists() else None

    def last_checkpoint(self) -> str | None:
        """The checkpoint a resume would start from now (the last one saved or loaded), for messages."""
        p = self.saved or self.loaded
        return str(p) if p is not None else None

    @staticmethod
    def candidates(root: Path) -> list[str]:
        """Checkpoint directories under ``root``, newest step first."""
        if not root.is_dir():
            return []
        found = [(s, p.name) for p in root.iterdir() if (s := _step_of(p.name)) is not None and p.is_dir()]
        return [name for _, name in sorted(found, reverse=True)]

    @staticmethod
    def problem(root: Path, tag: str, run_id: str | None = None, verify: bool = False) -> str | None:
        """Why checkpoint ``root/tag`` is incomplete, or None when it is complete (this process's view).

        With ``run_id``, a checkpoint whose markers record another run id is not complete for this run (one that
        records none, written before run ids, is taken as this run's). ``verify`` also reads every file a marker
        records a checksum of (:func:`megamix.train.markers.verify`); without it only sizes are checked."""
        d = root / tag
        markers = {}
        for m in d.glob("megamix_rank*.done.json"):
            try:
                doc = json.loads(m.read_text())
                markers[int(doc["rank"])] = doc
            except Exception as e:
                return f"{m} cannot be read ({type(e).__name__})"
        if markers:
            world = int(markers[min(markers)]["world_size"])
            missing = [r for r in range(world) if r not in markers]
            if missing:
                return (f"rank {missing[0]} of {world} did not finish writing it "
                        f"({DONE_FILE.format(rank=missing[0])} is missing)")
            other = sorted({str(doc.get("run_id")) for doc in markers.values()} - {"None", str(run_id)})
            if run_id and other:
                return f"written by another run: run id {other[0]}, this run's is {run_id}"
            for doc in markers.values():
                for name, size in doc["files"].items():
                    f = d / name
                    if not f.is_file():
                        return f"{f} is missing"
                    have = f.stat().st_size
                    if have != size:
                        return f"{f} has {have} bytes, {size} were written (truncated)"
            if verify:
                sums = {n: c for doc in markers.values() for n, c in (doc.get("checksums") or {}).items()}
                return mk.verify(d, sums)
            return None
        # no marker at all: a save that crashed before (or while) the ranks wrote them
        ranks = sorted(int(m.group(1)) for p in d.glob("megamix_rank*.pt") if (m := _OWN.search(p.name)))
        if not ranks:
            return f"it holds no megamix state ({SIDE_FILE.format(rank=0)} is missing)"
        return f"rank {ranks[0]} did not finish writing it ({DONE_FILE.format(rank=ranks[0])} is missing)"

    @staticmethod
    def world_size_of(root: Path, tag: str) -> int | None:
        """The world size checkpoint ``root/tag`` was written with (from its completion markers; None without
        one)."""
        for m in sorted((root / tag).glob("megamix_rank*.done.json")):
            return int(json.loads(m.read_text())["world_size"])
        return None

    def resumable(self) -> str | None:
        """The checkpoint a resume would try first, as seen from this process without reading it (the tag
        ``latest`` names when it is complete, else the newest complete one), or None when there is none. The run
        uses it before building the model: ``model.init_from`` is read only when nothing will be resumed."""
        return next((t for t in self.resume_order() if self.problem(self.root, t, self.run_id) is None), None)

    def resume_order(self) -> list[str]:
        """The checkpoint tags in the order a resume tries them: the one ``latest`` names, then the others, newest
        first."""
        tags = self.candidates(self.root)
        named = self.latest_tag()
        return ([named] if named in tags else []) + [t for t in tags if t != named]

    def _read(self, root: Path, tag: str, backend: Any) -> tuple[dict, Any]:
        """(side state, model state) of this rank, read into memory; raises _Unreadable. On a world size other than
        the checkpoint's, this rank's side state is merged from the old ranks' (:mod:`megamix.train.elastic`)."""
        path = root / tag
        ws = self.world_size_of(root, tag)
        if ws is None or ws == backend.world_size:
            side = _read_torch(path / SIDE_FILE.format(rank=backend.rank))
        else:
            sides = {r: _read_torch(path / SIDE_FILE.format(rank=r)) for r in elastic.sides_needed(backend.rank, ws)}
            try:
                side = elastic.merge_side_states(sides, backend.rank, backend.world_size)
            except (ValueError, KeyError) as e:
                raise _Unreadable(f"{path}: the side files of its {ws} ranks cannot be merged ({e})") from None
        try:
            state = backend.read(root, tag)
        except Exception as e:  # a backend names the file in its message; else name the checkpoint
            msg = str(e).strip()
            raise _Unreadable(msg if str(path) in msg else f"{path} cannot be read by the {backend.name} backend "
                              f"({type(e).__name__}: {msg[:160]})") from None
        return side, state

    def load(self, backend: Any, mixer: Any, cfg: Any = None) -> int:
        """Restore the newest complete, readable checkpoint (``latest``'s when it is one) into ``backend`` and
        ``mixer``; returns its step (0 when there is none). Collective: every rank calls it. With ``cfg``,
        the checkpoint's config is compared with it first (see :func:`check_resume_config`)."""
        root = self.root
        order = self.resume_order()
        if not order:
            return 0
        tags = self.candidates(root)
        skipped: list[str] = []
        chosen = side = state = None
        for tag in order:
            why = self.problem(root, tag, self.run_id, verify=self.checksums and backend.rank == 0)
            if why is None:
                try:
                    ws = self.world_size_of(root, tag)
                    if ws is not None and ws != backend.world_size and not callable(getattr(backend, "resize_note",
                                                                                            None)):
                        raise ConfigError(f"checkpoint {root / tag} was written with world size {ws}, this run has "
                                          f"{backend.world_size} and the {backend.name} backend cannot change it; "
                                          "resume with the same world size or start a new train.out_dir")
                    side, state = self._read(root, tag, backend)
                except _Unreadable as e:
                    why = str(e)
                    if backend.rank != 0:  # rank 0's warning below can only say that another rank failed
                        log.warning("megamix: rank %d: %s", backend.rank, why)
            if backend.any(why is not None):  # every rank decides alike
                skipped.append(f"{tag} ({why or 'another rank could not read its files'})")
                side = state = None
                continue
            chosen = tag
            break
        main = backend.rank == 0
        if chosen is None:
            if main:
                log.warning("megamix: no complete checkpoint to resume from in %s (%s); starting from step 0",
                            root, "; ".join(skipped))
            return 0
        if main:  # newer entries than the one resumed from were passed over: say why
            seen = {s.split(" ")[0] for s in skipped}
            for tag in tags:
                if _step_of(tag) > _step_of(chosen) and tag not in seen:
                    why = self.problem(root, tag, self.run_id)
                    skipped.append(f"{tag} ({why or f'complete, but {LATEST} names {chosen}'})")
        if skipped and main:
            log.warning("megamix: resuming from %s: %s", root / chosen, "; ".join(f"skipped {s}" for s in skipped))
        return self._restore(root, chosen, side, state, backend, mixer, cfg)

    def _restore(self, root: Path, tag: str, side: dict, state: Any, backend: Any, mixer: Any, cfg: Any) -> int:
        """Apply checkpoint ``tag`` (this rank's side state and the backend's model state, read by :meth:`_read`):
        the checks that need its side state first, then the backend, the mixer and the random state."""
        main, where = backend.rank == 0, root / tag
        written_by = side.get("backend", "deepspeed")
        # the plain and DDP backends write the same model.pt: each resumes the other's (a DDP run resumed by one
        # process runs the plain backend)
        if written_by != backend.name and {written_by, backend.name} != {"plain", "ddp"}:
            flag = str(written_by == "deepspeed").lower()
            raise ConfigError(f"checkpoint {where} was written by the {written_by!r} backend, this run "
                              f"uses {backend.name!r}; set deepspeed.enabled={flag} to resume it, or start a new "
                              "train.out_dir")
        old_world = side.get("resized_from")
        if old_world is not None:   # another world size (megamix.train.elastic): before any conversion
            now = (cfg if cfg is not None else mixer.cfg).train.global_batch_size
            elastic.check_global_batch(side, now, where)
        if cfg is not None:
            check_resume_config(side.get("config"), cfg, where, main=main)
        if old_world is not None and main:
            merged = f"of its {old_world} ranks are merged onto" if old_world > 1 else "go to"
            log.warning("megamix: checkpoint %s was written by %d rank(s), this run has %d: %s; the loader and "
                        "strategy state are its rank 0's, the round's statistics %s rank 0", where, old_world,
                        backend.world_size, backend.resize_note(root, tag), merged)
        backend.load(root, tag, state)
        mixer.load_state_dict(side["mixer"])
        restore_rng(side, getattr(backend, "device", None), where=where, main=main)
        self.loaded = where
        return int(side["step"])

    # ------------------------------------------------------------------------------------- writing
    def _phase(self, phase: str, step: int, rank: int) -> None:
        if self.on_phase is not None:
            self.on_phase(phase, step, rank)

    @staticmethod
    def _files_of(d: Path, rank: int) -> dict[str, int]:
        """The files of checkpoint directory ``d`` that rank ``rank``'s completion marker vouches for: the
        model/engine files (complete: every rank has passed the barrier after writing them), its own side
        file and, on rank 0, the config copy."""
        out = {}
        for p in sorted(d.rglob("*")):
            if not p.is_file() or ".tmp" in p.name:
                continue
            rel = p.relative_to(d).as_posix()
            m = _OWN.fullmatch(rel)
            if m and (m.group(2) == "done.json" or int(m.group(1)) != rank):
                continue
            if rel == CONFIG_COPY and rank != 0:
                continue
            out[rel] = p.stat().st_size
        return out

    @staticmethod
    def _hashed_by(files: dict[str, int], rank: int, world: int) -> list[str]:
        """The files of rank ``rank``'s marker (``files``) whose checksums it records: its share of the model/engine
        files (:func:`megamix.train.markers.share`: each is read by one rank), its own side file and, on rank 0,
        the config copy."""
        engine = {n: size for n, size in files.items() if not _OWN.fullmatch(n) and n != CONFIG_COPY}
        return mk.share(engine, rank, world) + [n for n in files if n not in engine]

    def save(self, step: int, backend: Any, mixer: Any, cfg: Any) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it); returns its directory.

        Raises :class:`megamix.train.guard.NonFiniteError` (and writes nothing) when any rank holds a
        non-finite parameter."""
        tag = tag_for(step)
        d = self.root / tag
        if not backend.params_finite():
            raise NonFiniteError(f"step {step}: the model parameters are not finite; checkpoint {d} was not "
                                 f"written (the last one is {self.last_checkpoint() or 'none'}). Lower train.lr")
        rank = backend.rank
        group = backend.group
        done = d / DONE_FILE.format(rank=rank)
        # Each block below ends with every rank agreeing on its outcome (megamix.comm.together, which is also the
        # barrier): a rank that fails to write (a full disk on rank 0) stops every rank with the same one-line
        # error at once, instead of the others waiting in the next collective until the timeout.
        with comm.together(f"preparing checkpoint {d}", group):
            d.mkdir(parents=True, exist_ok=True)
            done.unlink(missing_ok=True)  # this tag becomes complete again only through this save's markers
        with comm.together(f"writing the model files of checkpoint {d}", group):
            backend.save(self.root, tag)
        self._phase("model_saved", step, rank)
        with comm.together(f"writing megamix's files of checkpoint {d}", group):
            side = {"format": FORMAT, "step": int(step), "mixer": mixer.state_dict(),
                    **rng_state(getattr(backend, "device", None)),
                    "world_size": backend.world_size, "backend": backend.name, "config": cfg.to_dict(),
                    "run_id": self.run_id}
            with atomic_path(d / SIDE_FILE.format(rank=rank), tmp_suffix=".tmp") as tmp:
                torch.save(side, tmp)
            if rank == 0:
                atomic_write_text(d / CONFIG_COPY, cfg.to_yaml())
            self._phase("side_saved", step, rank)
            files = self._files_of(d, rank)
            sums = mk.checksums(d, self._hashed_by(files, rank, backend.world_size)) if self.checksums else {}
            atomic_write_json(done, {"format": FORMAT, "step": int(step), "rank": rank,
                                     "world_size": backend.world_size, "backend": backend.name,
                                     "run_id": self.run_id, "files": files, "checksums": sums})
            self._phase("marker_saved", step, rank)
        with comm.together(f"publishing checkpoint {d}", group):
            if rank == 0:
                atomic_write_text(self.root / LATEST, tag)
                self._phase("latest_saved", step, rank)
                self._prune(step, int(getattr(cfg.train, "keep_checkpoints", 0)))
        self.saved = d
        return d

    def _prune(self, step: int, keep: int) -> None:
        """Delete complete checkpoints older than ``step`` beyond the newest ``keep`` (rank 0, after ``latest``
        names ``step``'s); see the module docstring."""
        for stale in self.root.glob(".deleting_*"):  # a prune killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        if keep <= 0:
            return
        named = self.latest_tag()
        older = [t for t in self.candidates(self.root)
                 if (self.root / t).is_dir() and _step_of(t) < step
                 and self.problem(self.root, t, self.run_id) is None]
        for tag in older[max(keep - 1, 0):]:
            if tag == named:
                continue
            gone = self.root / f".deleting_{tag}"
            os.replace(self.root / tag, gone)  # disappears at once; the slow delete cannot leave a torn one
            shutil.rmtree(gone, ignore_errors=True)

    # ------------------------------------------------------------------------------------- the run of the folder
    def held(self) -> list[str]:
        """Checkpoint directories that hold anything (a save's temporary files, names with ``.tmp``, do not
        count), newest first."""
        return [t for t in self.candidates(self.root)
                if any(".tmp" not in p.name and p.is_file() for p in (self.root / t).rglob("*"))]

    def check_claim(self, resume: bool, overwrite: bool = False) -> None:
        """Raise the :class:`ConfigError` :meth:`claim` raises, changing nothing (the dry run's check): a new run
        (``resume`` false) in a folder that holds checkpoints, unless ``overwrite``."""
        old = [] if resume or overwrite else self.held()
        if old:
            shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
            raise ConfigError(f"train.out_dir={self.out_dir} holds checkpoints of an earlier run ({shown} in "
                              f"{self.root}) and train.resume=false starts a new run; pass --overwrite to delete "
                              "them (with that run's metrics and results), or set a new train.out_dir")

    def claim(self, resume: bool, overwrite: bool = False, main: bool = True, group: Any = None) -> str:
        """Make this run the run of ``train.out_dir``; returns its run id, which :meth:`save` records in every
        checkpoint and :meth:`load` requires (see *One run per folder* in the module docstring). Collective: every
        rank calls it, ``main`` (rank 0) does the work, then sends the id to the others (``group``: the backend's).

        - ``overwrite``: delete the checkpoints and the earlier run's files
          (:func:`megamix.train.markers.delete_run`); a new run id;
        - ``resume`` false: refuse a folder that holds checkpoints (:meth:`check_claim`); a new run id;
        - ``resume``: the run id ``run.json`` records; without one (a folder from before run ids, or an unreadable
          ``run.json``: said in one line) that of the newest checkpoint recording one, else a new run id."""
        rid = None
        with comm.together(f"claiming train.out_dir={self.out_dir} for this run", group):
            if main:
                for stale in self.out_dir.glob(".deleting_*"):  # an --overwrite killed half-way
                    shutil.rmtree(stale, ignore_errors=True)
                self.check_claim(resume, overwrite)
                if overwrite:
                    mk.delete_run(self.out_dir, self.root)
                order = [self.root / t for t in self.resume_order()]
                rid = mk.continued_run(self.out_dir, order) if resume and not overwrite else None
                if rid is None or rid != mk.recorded_run_id(self.out_dir):
                    rid = rid or mk.new_run_id()
                    mk.write_run_id(self.out_dir, rid)
        self.run_id = comm.broadcast_object(rid, group)
        return self.run_id


__all__ = ["Checkpoints", "SIDE_FILE", "DONE_FILE", "PHASES", "tag_for", "check_resume_config"]

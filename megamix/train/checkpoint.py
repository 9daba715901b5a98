"""The one checkpoint layout of the training loop, for every backend::

    <train.out_dir>/checkpoints/
        latest                   tag of the newest complete checkpoint (rank 0 writes it last, atomically)
        step_0000006/
            megamix_rank00000.pt per rank: step, mixer state (loader, strategy, round accumulators),
                                 torch RNG, world size, backend name, config
            model.pt             plain backend: model + optimizer state
            <engine files>       DeepSpeed: what engine.save_checkpoint(..., tag, save_latest=False) writes

``latest`` moves only after every rank's files of the new checkpoint are written (a barrier separates
them), so a checkpoint that ``latest`` names is complete. megamix 0.1 layouts are read too: the
single-process ``checkpoints/step_XXXXXXX.pt`` files and DeepSpeed's ``ds_checkpoints/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megamix.configbase import ConfigError

SIDE_FILE = "megamix_rank{rank:05d}.pt"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpoints:
    """Save and restore training state under ``<out_dir>/checkpoints`` (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoints"

    def _read_root(self) -> Path:
        """Where to resume from: ``checkpoints/``, or megamix 0.1's DeepSpeed ``ds_checkpoints/``."""
        legacy = self.out_dir / "ds_checkpoints"
        if not (self.root / LATEST).is_file() and (legacy / LATEST).is_file():
            return legacy
        return self.root

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names, if it names an existing checkpoint."""
        root = self._read_root()
        p = root / LATEST
        if not p.is_file():
            return None
        tag = p.read_text().strip()
        return tag if (root / tag).exists() else None

    def save(self, step: int, backend: Any, mixer: Any, cfg: Any) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it); returns its directory."""
        tag = tag_for(step)
        d = self.root / tag
        d.mkdir(parents=True, exist_ok=True)
        backend.save(self.root, tag)
        side = {"step": int(step), "mixer": mixer.state_dict(), "torch_rng": torch.get_rng_state(),
                "world_size": backend.world_size, "backend": backend.name, "config": cfg.to_dict()}
        path = d / SIDE_FILE.format(rank=backend.rank)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(side, tmp)
        os.replace(tmp, path)
        backend.barrier()
        if backend.rank == 0:
            _atomic_text(self.root / LATEST, tag)
        backend.barrier()
        return d

    def load(self, backend: Any, mixer: Any) -> int:
        """Restore the latest checkpoint into ``backend`` and ``mixer``; returns its step (0 if none)."""
        tag = self.latest_tag()
        if tag is None:
            return 0
        root = self._read_root()
        if (root / tag).is_file():  # megamix 0.1 single-process file
            state = torch.load(root / tag, map_location="cpu", weights_only=False)
            backend.load_legacy(state)
            mixer.load_state_dict(state["mixer"])
            torch.set_rng_state(state["torch_rng"])
            return int(state["step"])
        side_path = root / tag / SIDE_FILE.format(rank=backend.rank)
        if not side_path.is_file():
            n = len(list((root / tag).glob("megamix_rank*.pt")))
            raise ConfigError(f"{side_path} is missing: checkpoint {root / tag} was written by {n} rank(s) and this "
                              f"run has {backend.world_size}; resume with the same world size (each rank's round "
                              "accumulators are in its own file) or start a new train.out_dir")
        side = torch.load(side_path, map_location="cpu", weights_only=False)
        ws = side.get("world_size")
        if ws is not None and ws != backend.world_size:
            raise ConfigError(f"checkpoint {root / tag} was written with world size {ws}, this run has "
                              f"{backend.world_size}; resume with the same world size or start a new train.out_dir")
        written_by = side.get("backend", "deepspeed")
        if written_by != backend.name:
            raise ConfigError(f"checkpoint {root / tag} was written by the {written_by!r} backend, this run uses "
                              f"{backend.name!r}; set deepspeed.enabled={str(written_by == 'deepspeed').lower()} "
                              "to resume it, or start a new train.out_dir")
        backend.load(root, tag)
        mixer.load_state_dict(side["mixer"])
        torch.set_rng_state(side["torch_rng"])
        return int(side["step"])


__all__ = ["Checkpoints", "SIDE_FILE", "tag_for"]

"""DeepSpeed's universal checkpoints, for resuming a run on a different number of ranks (the DeepSpeed half of
:mod:`megamix.train.elastic`). With :mod:`megamix.integrations.deepspeed`, the only module that imports ``deepspeed``
(inside functions).

ZeRO 1-3 partition the optimizer states (and under ZeRO-3 the parameters) over the ranks, so a checkpoint's
engine files load only on the world size that wrote them. DeepSpeed's ``ds_to_universal`` tool rewrites them
as one folder per parameter (fp32 value, Adam's ``exp_avg``/``exp_avg_sq``, step) that its universal loading
path partitions for any world size. megamix converts a checkpoint once, into ``<checkpoint>/universal``
(:func:`ensure_universal`), and loads it with
:func:`megamix.integrations.deepspeed.engine_load` (``universal=True``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from megamix import comm
from megamix.configbase import ConfigError
from megamix.integrations import deepspeed as ds_glue

#: the folder inside a checkpoint directory that holds its DeepSpeed universal checkpoint (the output of
#: ``deepspeed.checkpoint.ds_to_universal``): megamix converts into it when a run resumes on a different number
#: of ranks, and uses one that is already there (e.g. converted by the user, see docs/training.md)
UNIVERSAL_DIR = "universal"


def saved_partitions(folder: str | Path) -> int:
    """Over how many ranks the engine files in checkpoint directory ``folder`` partition the optimizer states: one
    ``*optim_states.pt`` file per data-parallel rank under ZeRO 1-3 and DeepSpeed's bf16 optimizer; 0 without them
    (ZeRO-0 in fp32: every rank reads the one replicated ``mp_rank_00_model_states.pt``, on any world size)."""
    return len(list(Path(folder).glob("*optim_states.pt")))


def needs_universal(folder: str | Path, world_size: int) -> bool:
    """Whether the engine files in ``folder`` load on ``world_size`` ranks only through a universal checkpoint."""
    n = saved_partitions(folder)
    return n > 0 and n != world_size


def resize_note(folder: str | Path, world_size: int) -> str:
    """How the engine state of checkpoint directory ``folder`` is restored on ``world_size`` ranks, in words."""
    if not needs_universal(folder, world_size):
        return "DeepSpeed loads its engine files as they are (no optimizer state is partitioned over the ranks)"
    u = Path(folder) / UNIVERSAL_DIR
    how = "already there" if universal_complete(u) else "rank 0 converts the ZeRO files into it now"
    return f"DeepSpeed loads the universal checkpoint {u} ({how})"


def load_engine_files(engine, ckpt_root: Path, tag: str, rank: int, world_size: int, group) -> None:
    """Load checkpoint ``ckpt_root/tag`` into ``engine`` (collective): as it is, or on a world size other than
    the one that partitioned its optimizer states through its universal checkpoint, which rank 0 makes first
    (:func:`ensure_universal`; one already complete is used, also one the user put there) while the others wait."""
    d = Path(ckpt_root) / tag
    if not needs_universal(d, world_size):
        ds_glue.load_engine(engine, ckpt_root, tag)
        return
    with comm.together(f"converting checkpoint {d} to DeepSpeed's universal format", group):
        if rank == 0:
            ensure_universal(d)
    path, why = ds_glue.engine_load(engine, d, UNIVERSAL_DIR, universal=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load the universal checkpoint {d / UNIVERSAL_DIR}{why}: delete that "
                          "folder to convert it again, or resume with the world size the checkpoint was written with")
    if engine.zero_optimization_partition_weights():
        repair_zero3_load(engine, d / UNIVERSAL_DIR)   # two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader


def universal_complete(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete universal checkpoint: the optimizer's common state
    (``zero/optimizer_state.pt``) and the engine's model-states file(s). megamix's conversion renames a finished
    folder into place, so a half-written one never has the final name; the tool, run by hand into the folder,
    writes those files last."""
    f = Path(folder)
    return (f / "zero" / "optimizer_state.pt").is_file() and any(f.glob("*model_states.pt"))


def ensure_universal(ckpt_dir: str | Path, workers: int = 1) -> bool:
    """Convert the engine files of checkpoint directory ``ckpt_dir`` into ``ckpt_dir/``:data:`UNIVERSAL_DIR` with
    DeepSpeed's ``ds_to_universal`` (in this process), unless a complete one is already there; returns whether
    it converted. One process calls it (megamix: rank 0, the others wait).

    Atomic: the tool writes into ``ckpt_dir/.universal.tmp/universal`` (it also writes a ``latest_universal``
    file next to its output folder, which stays in the temp folder), which is then renamed into place; a crash
    leaves only the temp folder, removed by the next conversion. ``workers`` > 1 lets the tool fork processes."""
    import argparse
    import io
    import os
    import shutil

    ckpt_dir = Path(ckpt_dir)
    dst = ckpt_dir / UNIVERSAL_DIR
    if universal_complete(dst):
        return False
    from deepspeed.checkpoint import ds_to_universal

    work = ckpt_dir / f".{UNIVERSAL_DIR}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)   # an incomplete one (not megamix's: megamix renames complete ones)
    out = work / UNIVERSAL_DIR
    args = argparse.Namespace(input_folder=str(ckpt_dir), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)   # megamix's models carry no universal_checkpoint_info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:
        last = (str(e).strip() or log.getvalue().strip()).splitlines()
        raise ConfigError(f"DeepSpeed's ds_to_universal could not convert checkpoint {ckpt_dir} ({type(e).__name__}: "
                          f"{last[-1][:200] if last else ''}); resume with the world size it was written with, or "
                          f"convert it yourself into {dst}") from e
    os.replace(out, dst)
    shutil.rmtree(work, ignore_errors=True)
    return True


def repair_zero3_load(engine, folder: Path) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader (``folder``: the universal checkpoint it read):

    - it gives every param group the hyper-parameters of group 0 (megamix's no-decay group would get weight
      decay): each group gets its own saved values back (``zero/optimizer_state.pt`` keeps the torch optimizer's
      groups, one per param group on any world size);
    - it gives every group's Adam state one shared ``step`` tensor, which torch's Adam then advances once per
      group and step (wrong bias corrections from the first step on): each state gets its own copy."""
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("optimizer_state_dict", {}).get("param_groups") or saved.get("param_groups") or []
    opt = engine.optimizer.optimizer
    if len(groups) != len(opt.param_groups):
        raise ConfigError(f"the universal checkpoint {folder} has {len(groups)} optimizer param group(s), this "
                          f"engine has {len(opt.param_groups)}: it was written for another model or optimizer set-up")
    for g, s in zip(opt.param_groups, groups):
        g.update({k: v for k, v in s.items() if k != "params"})
    for state in opt.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


__all__ = ["UNIVERSAL_DIR", "saved_partitions", "needs_universal", "resize_note", "load_engine_files",
           "universal_complete", "ensure_universal", "repair_zero3_load"]

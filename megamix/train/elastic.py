"""Resuming a checkpoint on a different number of ranks: megamix's side of it, for every backend.

A checkpoint (:mod:`megamix.train.checkpoint`) holds one side file per rank that wrote it. When a run resumes
it on another world size, :meth:`megamix.train.checkpoint.Checkpoints.load` reads the old ranks' side files this
new rank needs (:func:`sides_needed`) and builds this rank's state from them (:func:`merge_side_states`); the
backend restores its model state its own way (DeepSpeed: a universal checkpoint, see
:meth:`megamix.train.backend.DeepSpeedBackend.load`). What may change and what may not:

- the global batch size may not (the sample stream is defined per global batch; :func:`check_global_batch`);
  the micro-batch size and the gradient accumulation steps may (``train.micro_batch_size`` needs listing in
  ``train.resume_allow_changes``; a world size change alone changes only the accumulation steps);
- the loader state and the strategy state are the same on every rank: the new ranks take old rank 0's;
- the round's statistics are per-rank partial sums, merged onto the new rank 0
  (:meth:`megamix.stats.DomainStats.merge_states`);
- random state: new rank r takes old rank r's, or old rank 0's when the old run had no rank r. Only dropout
  draws from it (``model.dropout``, 0 by default; the loader and the reservoir use seeded hashes), and with
  dropout no resume on another world size can match an uninterrupted run: each rank draws its own masks.
"""
from __future__ import annotations

from typing import Any, Mapping

from megamix.configbase import ConfigError
from megamix.stats import DomainStats


def sides_needed(new_rank: int, old_world: int) -> list[int]:
    """The old ranks whose side files new rank ``new_rank`` reads: every one for the new rank 0 (it merges the
    round's statistics and checks that the loader states agree), old rank 0 and its own old rank for the others."""
    if new_rank == 0:
        return list(range(old_world))
    return sorted({0, new_rank} & set(range(old_world)))


def merge_side_states(sides: Mapping[int, dict], new_rank: int, new_world: int) -> dict:
    """The side state (what :meth:`~megamix.train.checkpoint.Checkpoints.save` writes per rank: ``step``,
    ``mixer``, ``torch_rng``/``cuda_rng``, ``world_size``, ``backend``, ``config``) of rank ``new_rank`` of a run
    with ``new_world`` ranks, from the side states of the ranks that wrote the checkpoint.

    Backend-independent: ``sides`` maps old rank -> its loaded side file, at least the ranks
    :func:`sides_needed` names. The result is old rank 0's state with: the mixer's loader state (checked equal
    on every old rank given) and strategy state of old rank 0; its round statistics from
    :meth:`megamix.stats.DomainStats.merge_states` (the sum of every old rank's on the new rank 0, an empty round
    on the others); the random state of old rank ``new_rank`` when there was one, else of old rank 0;
    ``world_size`` = ``new_world`` and ``resized_from`` = the old world size. Raises ValueError when the side
    states do not belong to one checkpoint (a different step or world size, loader states that differ, a
    missing rank)."""
    if 0 not in sides:
        raise ValueError("merging side states needs old rank 0's")
    first = sides[0]
    old_world = int(first["world_size"])
    missing = [r for r in sides_needed(new_rank, old_world) if r not in sides]
    if missing:
        raise ValueError(f"merging side states for new rank {new_rank} needs old rank(s) {missing}")
    for r, sd in sorted(sides.items()):
        if int(sd["step"]) != int(first["step"]) or int(sd["world_size"]) != old_world:
            raise ValueError(f"the side states of old ranks 0 and {r} are of different saves (step "
                             f"{first['step']} vs {sd['step']}, world size {old_world} vs {sd['world_size']})")
        if sd["mixer"]["loader"] != first["mixer"]["loader"]:
            raise ValueError(f"the loader states of old ranks 0 and {r} differ (they are the same on every rank of a "
                             "run): the checkpoint is damaged")
    stats = [sides[r]["mixer"]["stats"] for r in sorted(sides)] if new_rank == 0 else [first["mixer"]["stats"]]
    mixer = {**first["mixer"], "stats": DomainStats.merge_states(stats, rank=new_rank)}
    rng = sides.get(new_rank, first)
    return {**first, "mixer": mixer, "torch_rng": rng["torch_rng"], "cuda_rng": rng.get("cuda_rng"),
            "world_size": int(new_world), "resized_from": old_world}


def check_global_batch(side: dict, now: int, where: Any) -> None:
    """Refuse, in one line, a resume on another world size whose ``train.global_batch_size`` differs from the
    checkpoint's (``side``: a side state)."""
    saved = ((side.get("config") or {}).get("train") or {}).get("global_batch_size")
    if saved is None:
        saved = side["mixer"]["loader"]["sampler"]["global_batch_size"]
    if int(saved) != int(now):
        raise ConfigError(f"train.global_batch_size={now} but checkpoint {where} was written with "
                          f"train.global_batch_size={saved}: the sample stream is defined per global batch, so a "
                          f"resume on another world size keeps it; set train.global_batch_size={saved} (the "
                          "micro-batch size and gradient accumulation may change)")


__all__ = ["sides_needed", "merge_side_states", "check_global_batch"]

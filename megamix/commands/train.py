"""`megamix train`: pretraining with static or online mixing (single process, DDP under torchrun, or DeepSpeed)."""
from __future__ import annotations

import os

from megamix.commands.config import add_config_args, load_config
from megamix.configbase import ConfigError


def register(sub) -> None:
    p = sub.add_parser("train", help="Pretrain a GPT on the token store with static or online mixing.",
                       description="Single-process training by default; launched with several processes "
                                   "(torchrun, srun) it runs data-parallel with torch DDP; with "
                                   "deepspeed.enabled=true it runs through a DeepSpeed engine (launch it with "
                                   "torchrun/deepspeed, see launch/).")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="Validate the config (and launch geometry) and print it, without training.")
    p.add_argument("--no-progress", action="store_true", help="Disable the progress bar.")
    p.set_defaults(func=run)


def _dist_env() -> tuple[int, int, int | None]:
    """Rank, world size and local rank from the launcher's environment (torchrun, deepspeed, SLURM via srun)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    return rank, world, None if local is None else int(local)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args)
    rank, world, local_rank = _dist_env()
    if world > 1 and not args.dry_run and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ConfigError(f"world size {world} (from WORLD_SIZE/SLURM_NTASKS) but MASTER_ADDR/MASTER_PORT are not "
                          "set: launch with torchrun (or the deepspeed launcher), or export the first node's address "
                          "and a free port as MASTER_ADDR/MASTER_PORT before srun")
    from megamix.train.backend import make_backend

    backend = make_backend(cfg, rank, world, local_rank=local_rank)
    if args.dry_run:
        notes = backend.check(cfg)
        if rank == 0:
            for note in notes:
                print(f"# note: {note}")
            print(cfg.to_yaml(), end="")
            print(f"# dry run OK: backend={backend.name}, world_size={world}, config valid, nothing trained")
        return 0
    from megamix.train.loop import train

    train(cfg, backend=backend, progress=not args.no_progress)
    return 0

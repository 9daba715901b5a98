"""`megamix train`: pretraining with static or online mixing (single process, or DeepSpeed)."""
from __future__ import annotations

import os

from megamix.commands.config import add_config_args, load_config


def register(sub) -> None:
    p = sub.add_parser("train", help="Pretrain a GPT on the token store with static or online mixing.",
                       description="Single-process training by default; with deepspeed.enabled=true it "
                                   "runs through a DeepSpeed engine (launch it with torchrun/deepspeed, "
                                   "see launch/).")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="Validate the config (and launch geometry) and print it, without training.")
    p.add_argument("--no-progress", action="store_true", help="Disable the progress bar.")
    p.set_defaults(func=run)


def _dist_env() -> tuple[int, int]:
    """Rank/world size from the launcher's environment (torchrun, deepspeed, SLURM via srun)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, world


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args)
    rank, world = _dist_env()
    from megamix.train.backend import make_backend

    backend = make_backend(cfg, rank, world)
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

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


#: test-only: ``PHASE@STEP`` (every rank) or ``PHASE@STEP@RANK``, comma-separated; the process SIGKILLs itself
#: when a checkpoint save reaches that point (phases: megamix.train.checkpoint.PHASES). tests/test_train_torture.py
KILL_ENV = "MEGAMIX_TEST_KILL_AT"


def _kill_hook(spec: str | None):
    """The checkpoint hook for ``MEGAMIX_TEST_KILL_AT`` (None when unset): a crash at a named point."""
    if not spec:
        return None
    import signal

    from megamix.configbase import ConfigError
    from megamix.train.checkpoint import PHASES

    points = set()
    for item in spec.split(","):
        parts = item.strip().split("@")
        if len(parts) not in (2, 3) or parts[0] not in PHASES or not all(x.isdigit() for x in parts[1:]):
            raise ConfigError(f"{KILL_ENV}={spec!r}: expected PHASE@STEP[@RANK] with PHASE one of {', '.join(PHASES)}")
        points.add((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))

    def hook(phase: str, step: int, rank: int) -> None:
        if (phase, step, rank) in points or (phase, step, None) in points:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


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

    train(cfg, backend=backend, progress=not args.no_progress, checkpoint_hook=_kill_hook(os.environ.get(KILL_ENV)))
    return 0

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
    if args.dry_run:
        if cfg.deepspeed.enabled:
            from megamix.integrations.deepspeed import validate_launch
            info = validate_launch(cfg, world)
            for note in info.get("notes", []):
                print(f"# note: {note}")
        elif world > 1:
            from megamix.configbase import ConfigError
            raise ConfigError(f"WORLD_SIZE={world} but deepspeed.enabled=false: the plain trainer is "
                              "single-process; set deepspeed.enabled=true for multi-rank runs")
        print(cfg.to_yaml(), end="")
        print(f"# dry run OK: world_size={world}, config valid, nothing trained")
        return 0
    if cfg.deepspeed.enabled:
        from megamix.integrations.deepspeed import run_deepspeed_training
        run_deepspeed_training(cfg, rank=rank, world_size=world)
        return 0
    from megamix.train.trainer import train
    res = train(cfg, progress=not args.no_progress)
    print(f"\nfinal per-domain validation loss (avg {res.valid_loss_avg:.4f}):")
    for d, v in sorted(res.valid_loss.items(), key=lambda kv: kv[0]):
        print(f"  {d:24s} {v:7.4f}   weight {res.weights.get(d, float('nan')):.3f}")
    print(f"throughput: {res.tokens_per_second:.0f} tokens/s; wall {res.wall_seconds:.0f}s")
    print(f"plot: {res.plot}\nmetrics: {res.out_dir}/metrics.jsonl")
    return 0

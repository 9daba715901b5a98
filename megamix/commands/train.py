"""`megamix train`: pretraining with static or online mixing (single process, DDP under torchrun, or DeepSpeed).

Both ``--dry-run`` and the real run first run :func:`megamix.train.preflight.check_run` (config, devices,
launch geometry, data dir, every domain's token files, the mixture), so a dry run checks everything the
real run checks at start-up. SIGUSR1 and SIGTERM ask the run to save a checkpoint at the next step
boundary and stop (a second signal kills at once); run the same command again to resume. One run per
``train.out_dir``: a new run (``train.resume=false``) refuses a folder holding an earlier run's checkpoints
unless ``--overwrite`` (delete them first) is given (:meth:`megamix.train.checkpoint.Checkpoints.claim`).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from pathlib import Path

from megamix import comm
from megamix.commands.config import add_config_args, load_config
from megamix.configbase import ConfigError

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def register(sub) -> None:
    p = sub.add_parser("train", help="Pretrain a GPT on the token store with static or online mixing.",
                       description="Single-process training by default; launched with several processes "
                                   "(torchrun, srun) it runs data-parallel with torch DDP; with "
                                   "deepspeed.enabled=true it runs through a DeepSpeed engine (launch it with "
                                   "torchrun/deepspeed, see launch/). SIGUSR1 or SIGTERM: save a checkpoint at the "
                                   "next step boundary and stop (resume by running the same command).")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="Run every start-up check of the real run (config, devices, launch geometry, data dir, "
                        "token files, mixture) and print the config and derived geometry, without training.")
    p.add_argument("--no-progress", action="store_true", help="Disable the progress bar.")
    p.add_argument("--overwrite", action="store_true",
                   help="Start a new run in train.out_dir even though it holds an earlier run's checkpoints: delete "
                        "them and that run's metrics and results first (without it, a new run, train.resume=false, "
                        "refuses such a folder; a resume continues the run there).")
    p.set_defaults(func=run)


def _env_int(names: tuple[str, ...]) -> int | None:
    """The first of ``names`` set in the environment, as an integer (a ConfigError names a bad value)."""
    name = next((n for n in names if n in os.environ), None)
    if name is None:
        return None
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an integer; unset it, or "
                          "launch with torchrun/deepspeed/srun, which set it") from None


def dist_env() -> tuple[int, int, int | None]:
    """Rank, world size and local rank from the launcher's environment (torchrun, deepspeed, SLURM via srun)."""
    rank = _env_int(("RANK", "SLURM_PROCID"))
    world = _env_int(("WORLD_SIZE", "SLURM_NTASKS"))
    rank, world = (0 if rank is None else rank), (1 if world is None else world)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} and world size {world} from the environment (RANK/WORLD_SIZE) do not fit: "
                          "need 0 <= RANK < WORLD_SIZE; unset them, or launch with torchrun/deepspeed/srun")
    return rank, world, _env_int(("LOCAL_RANK", "SLURM_LOCALID"))


class StopFlag:
    """Callable for the loop's ``stop_requested``: True once SIGUSR1 or SIGTERM arrived.

    A second signal restores the default action and re-sends itself (the process dies at once)."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.rank == 0:
            print(f"megamix: got {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                  "stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    def install(self) -> "StopFlag":
        try:
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (e.g. called from a worker thread): leave signals alone
            self.restore()
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def write_failure(e: BaseException, out_dir: str | Path) -> str | None:
    """One line for a failed write under ``out_dir`` (disk full, quota), or None if ``e`` is something else.

    An ``OSError`` raised by ``write()``/``close()`` carries no file name, and ``torch.save`` reports a
    short write as a ``RuntimeError`` from its zip writer; both are named here by the run directory."""
    out = Path(out_dir)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is None:
        return (f"no space left on the device holding train.out_dir={out} ({e.strerror}): free space there or "
                "point train.out_dir at another disk")
    text = str(e)
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "unexpected pos" in text):
        try:
            free = f"{shutil.disk_usage(out if out.exists() else out.parent).free / 2 ** 30:.1f} GiB free there"
        except OSError:
            free = "free space unknown"
        return (f"writing a checkpoint under train.out_dir={out} failed ({text.splitlines()[0].strip()}; {free}): "
                "free space there or point train.out_dir at another disk")
    return None


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args)
    args.shared_dir = cfg.train.out_dir   # every rank sees it: the CLI prints a start-up error there once
    rank, world, local_rank = dist_env()
    if world > 1 and not args.dry_run and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ConfigError(f"world size {world} (from WORLD_SIZE/SLURM_NTASKS) but MASTER_ADDR/MASTER_PORT are not "
                          "set: launch with torchrun (or the deepspeed launcher), or export the first node's address "
                          "and a free port as MASTER_ADDR/MASTER_PORT before srun")
    from megamix.train.backend import make_backend
    from megamix.train.preflight import check_run

    backend = make_backend(cfg, rank, world, local_rank=local_rank)
    pre = check_run(cfg, backend)
    if args.dry_run:
        from megamix.train.checkpoint import Checkpoints

        ckpts = Checkpoints(cfg.train.out_dir)
        ckpts.check_claim(cfg.train.resume, args.overwrite)   # what the real run refuses at start-up
        if args.overwrite and ckpts.held():
            pre.notes.append(f"--overwrite: the run will delete the {len(ckpts.held())} checkpoint(s) in "
                             f"{ckpts.root} and the earlier run's metrics and results")
        if rank == 0:  # every rank checks, rank 0 reports
            for note in pre.notes:
                print(f"# note: {note}")
            print(cfg.to_yaml(), end="")
            print("\n".join(pre.describe()))
            print(f"# dry run OK: backend={backend.name}, world_size={world}, config valid, data and mixture "
                  "checked, nothing trained")
        return 0
    from megamix.train.loop import train
    from megamix.train.stop import StopRequested

    flag = StopFlag(rank).install()
    try:
        train(cfg, backend=backend, progress=not args.no_progress, plan=pre, stop_requested=flag,
              overwrite=args.overwrite)
    except StopRequested as e:
        comm.shutdown()   # every rank stopped at the same step
        if rank == 0:
            print(f"megamix: {e}", file=sys.stderr)
        return 0
    except (OSError, RuntimeError) as e:
        msg = write_failure(e, cfg.train.out_dir)
        if msg is None:
            raise
        raise ConfigError(msg) from e
    finally:
        flag.restore()
    # the process's job ends here: a barrier, then the group (DeepSpeed's; DDP's backend ended its own) is
    # destroyed, so gloo's threads stop before the interpreter exits instead of aborting it now and then
    comm.shutdown()
    return 0

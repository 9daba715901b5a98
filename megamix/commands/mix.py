"""`megamix mix`: list the mixing strategies, or run one on saved statistics (``simulate``)."""
from __future__ import annotations

import json
import sys

import numpy as np

from megamix.commands.config import add_config_args
from megamix.configbase import ConfigError


def register(sub) -> None:
    p = sub.add_parser("mix", help="List mixing strategies or simulate one on saved statistics.",
                       description="`megamix mix --list` shows the strategies. `megamix mix simulate "
                                   "--snapshot s.npz --set mixing.strategy=rnb` runs a strategy on saved "
                                   "StatsSnapshot files (see megamix.snapshot), one round "
                                   "per file, and prints the weights.")
    p.add_argument("--list", action="store_true", help="List the strategies and exit.")
    msub = p.add_subparsers(dest="mix_command", metavar="SUBCOMMAND")
    s = msub.add_parser("simulate", help="Run a strategy on saved snapshots (.npz).")
    add_config_args(s)
    s.add_argument("--snapshot", action="append", required=True, metavar="FILE.npz",
                   help="A saved StatsSnapshot; repeat for several rounds (used in order).")
    s.add_argument("--strategy", default=None, help="Shortcut for --set mixing.strategy=NAME.")
    s.add_argument("--init", default="uniform",
                   help="Initial weights: uniform | counts (the first snapshot's sample shares) | "
                        "comma-separated numbers.")
    s.add_argument("--repeat", type=int, default=1, help="Feed each snapshot this many rounds.")
    s.add_argument("--out-dir", default=None, help="Write telemetry PNGs and weights.json here.")
    s.add_argument("--json", action="store_true", help="Print one JSON line per round.")
    s.set_defaults(func=run_simulate)
    p.set_defaults(func=run)


def run(args) -> int:
    from megamix.strategies import describe_strategies
    from megamix.strategies.dograph import OBJECTIVES

    if args.list or args.mix_command is None:
        print("mixing strategies (mixing.strategy):")
        for line in describe_strategies():
            print("  " + line)
        print(f"DoGraph objectives (mixing.dograph_objective): {', '.join(OBJECTIVES)}")
        print("Guards for every online strategy: mixing.min_weight, mixing.ema (null = the strategy's default: "
              "rnb 0/0 as in the paper, rnb-damped 0.02/0.5, dograph 0.01/0), mixing.min_count; "
              "`megamix config --explain` documents every mixing.* field.")
    return 0


def _initial(spec: str, snap) -> np.ndarray:
    from megamix.mixture import uniform_weights
    from megamix.simplex import normalize

    d = len(snap.domain_names)
    if spec == "uniform":
        return uniform_weights(d)
    if spec == "counts":
        return normalize(np.maximum(snap.counts, 0) + 1e-12)
    try:
        vals = [float(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--init must be uniform, counts or {d} comma-separated numbers, got {spec!r}") from None
    if len(vals) != d:
        raise ConfigError(f"--init has {len(vals)} numbers for {d} domains; give one per domain")
    try:
        return normalize(vals)
    except ValueError as e:
        raise ConfigError(f"--init {spec!r}: {e}; give {d} numbers >= 0 with a positive sum") from None


def _load_snapshot(path: str, load):
    """A snapshot file, or a ConfigError naming --snapshot and the file."""
    import zipfile
    from pathlib import Path

    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"--snapshot {path} {what}; pass a .npz written by save_snapshot_npz (a run dumps one "
                          "per mixing round)")
    try:
        return load(path)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ConfigError(f"--snapshot {path} is not a StatsSnapshot .npz ({' '.join(str(e).split())[:200]}); pass "
                          "a file written by save_snapshot_npz") from None


def run_simulate(args) -> int:
    from megamix.config import MegamixConfig
    from megamix.strategies import build_strategy
    from megamix.snapshot import load_snapshot_npz

    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"mixing.strategy={args.strategy}")
    cfg = MegamixConfig.from_yaml(args.config, overrides)
    mcfg = cfg.mixing.validate()
    snaps = [_load_snapshot(p, load_snapshot_npz) for p in args.snapshot]
    names = snaps[0].domain_names
    for p, s in zip(args.snapshot, snaps):
        if s.domain_names != names:
            raise ConfigError(f"--snapshot {p} has domains {s.domain_names}, the first has {names}; pass snapshots "
                              "of one run")
    strat = build_strategy(mcfg, names, _initial(args.init, snaps[0]))
    w = strat.initial_weights     # the weights in force: this command plays the loader's part
    step = 0
    rounds = []  # (step, weights) per round: this command's output, as printed
    for s in snaps:
        for _ in range(max(1, args.repeat)):
            step += mcfg.update_every
            strat.observe(s)
            w = strat.propose(step, w)
            rounds.append((step, w.tolist()))
            info = strat.last_info
            if args.json:
                print(json.dumps({"step": step, "weights": dict(zip(names, w.tolist())),
                                  "fallback": info.get("fallback"),
                                  "kept_previous": info.get("kept_previous", [])}))
            else:
                ws = "  ".join(f"{n}={x:.4f}" for n, x in zip(names, w))
                extra = f"  [fallback: {info['fallback']}]" if info.get("fallback") else ""
                print(f"step {step:6d}  {ws}{extra}")
    if args.out_dir:
        from pathlib import Path

        from megamix.strategies.plots import plot_strategy
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "weights.json").write_text(json.dumps({"domains": names, "strategy": strat.name,
                                                      "history": rounds}, indent=1))
        for pth in plot_strategy(strat, out, prefix=f"mix_{strat.name}", history=rounds):
            print(f"wrote {pth}", file=sys.stderr)
    return 0

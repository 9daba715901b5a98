"""`megamix config`: print, explain and validate run configs."""
from __future__ import annotations

from megamix.config import MegamixConfig
from megamix.strategies import check_strategy_name


def add_config_args(p) -> None:
    """--config FILE and repeated --set section.key=value, shared by every command taking a config."""
    p.add_argument("--config", "-c", default=None, help="YAML config file (see configs/).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one field, e.g. --set train.steps=20 (repeatable).")


def load_config(args) -> MegamixConfig:
    cfg = MegamixConfig.from_yaml(args.config, args.overrides).validate()
    check_strategy_name(cfg.mixing.strategy)   # the strategies' registry owns the names
    return cfg


def register(sub) -> None:
    p = sub.add_parser("config", help="Print, explain or validate a run config.")
    add_config_args(p)
    p.add_argument("--explain", action="store_true", help="List every field with its documentation.")
    p.add_argument("--params", action="store_true",
                   help="Also count the model's parameters (built on the meta device: nothing is allocated).")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.explain:
        print("\n".join(MegamixConfig.explain()))
        return 0
    cfg = load_config(args)
    print(cfg.to_yaml(), end="")
    if args.params:
        from megamix.train.model import count_config_parameters

        n = count_config_parameters(cfg.model)
        print(f"# model: {n['class']}, {n['total']:,} parameters ({n['non_embedding']:,} non-embedding)")
    return 0

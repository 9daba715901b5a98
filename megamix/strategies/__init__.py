"""Online mixing strategies: static baselines, R&B Balance (paper and damped) and DoGraph (gradient
reweighting, or sampling).

``build_strategy(cfg, domain_names, initial_weights, max_drift=None)`` returns the strategy named by
``cfg.strategy`` (a :class:`megamix.config.MixingConfig`). ``STRATEGIES`` is the one registry of names: it
lists them with a one-line description (shown by ``megamix mix --list``), and
:func:`register_strategy` adds one (docs/contributing.md walks through it).
"""
from __future__ import annotations

from typing import Sequence

from megamix.configbase import ConfigError
from megamix.strategies.base import MixingStrategy
from megamix.strategies.baselines import StaticStrategy
from megamix.strategies.dograph import DoGraphSampleStrategy, DoGraphStrategy
from megamix.strategies.rnb import RnBDampedStrategy, RnBStrategy

__all__ = ["MixingStrategy", "StaticStrategy", "RnBStrategy", "RnBDampedStrategy", "DoGraphStrategy",
           "DoGraphSampleStrategy", "STRATEGIES",
           "build_strategy", "describe_strategies", "register_strategy", "check_strategy_name"]

#: name -> (class, description)
STRATEGIES: dict[str, tuple[type[MixingStrategy], str]] = {
    "static": (StaticStrategy, "fixed weights (natural/uniform/temperature/explicit/file mixture)"),
    "rnb": (RnBStrategy, "R&B Balance as in the paper: p <- softmax(lambda * Gp/||Gp||) from the domain "
                         "gradient Gram; no EMA, no floor"),
    "rnb-damped": (RnBDampedStrategy, "R&B Balance damped: EMA 0.5 and a 0.02 floor by default"),
    "dograph": (DoGraphStrategy, "DoGraph (paper): k-means of per-sample gradients -> cluster weights pi by "
                                 "objective (uncertainty|variance|robust|alignment) -> each sample's loss "
                                 "weighted by its cluster's pi in every step (update = sum_c pi_c g_c)"),
    "dograph-sample": (DoGraphSampleStrategy, "DoGraph variant: the same cluster weights pi mapped to domain "
                                              "sampling weights w_d = sum_c pi_c n_cd/n_c (no gradient weights)"),
}


def register_strategy(name: str, cls: type[MixingStrategy], description: str) -> None:
    """Make ``mixing.strategy=name`` build ``cls`` (a :class:`MixingStrategy` subclass whose ``name`` is ``name``)."""
    if not (isinstance(cls, type) and issubclass(cls, MixingStrategy)):
        raise TypeError(f"{cls!r} is not a MixingStrategy subclass")
    if cls.name != name:
        raise ValueError(f"{cls.__name__}.name is {cls.name!r}; register it under that name, or set name = {name!r}")
    if name in STRATEGIES and STRATEGIES[name][0] is not cls:
        raise ValueError(f"a strategy named {name!r} is already registered ({STRATEGIES[name][0].__name__})")
    STRATEGIES[name] = (cls, description)


def check_strategy_name(name: str) -> None:
    """ConfigError (one line, with the choices) unless ``name`` is a registered strategy."""
    if name not in STRATEGIES:
        raise ConfigError(f"mixing.strategy must be one of {', '.join(STRATEGIES)} (got {name!r}); "
                          "see `megamix mix --list`")


def describe_strategies() -> list[str]:
    """One line per strategy: name and description."""
    return [f"{name:14s} {desc}" for name, (_, desc) in STRATEGIES.items()]


def build_strategy(cfg, domain_names: Sequence[str], initial_weights, *,
                   max_drift: float | None = None) -> MixingStrategy:
    """The strategy named ``cfg.strategy``, validated, starting from ``initial_weights``.

    With ``max_drift`` every update stays within ``initial_weights ± max_drift`` in every domain
    (the strategy's last guard, see :mod:`megamix.strategies.base`); the Mixer passes a prior
    mixture file's ``meta.max_drift`` here.
    """
    cfg.validate()
    check_strategy_name(cfg.strategy)
    cls = STRATEGIES[cfg.strategy][0]
    _, floor = cls.guards(cfg)
    if cfg.strategy != "static" and len(domain_names) * floor > 1:
        raise ConfigError(f"mixing.min_weight={floor} ({'set' if cfg.min_weight is not None else cfg.strategy + ' default'}) "
                          f"is infeasible for {len(domain_names)} "
                          f"domains; use at most {1 / len(domain_names):.4g}")
    return cls(domain_names, initial_weights, cfg, max_drift=max_drift)

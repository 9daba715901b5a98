"""The :class:`MixingStrategy` interface and the guards every online strategy shares.

Life cycle (driven by the Mixer, identically on every rank)::

    strategy.observe(snapshot)              # all-reduced statistics of the last round of K steps
    w = strategy.propose(step, current)     # new weights (sum 1, >= 0) from the weights in force

The weights in force have one owner, the loader's sampler (``Mixer.weights``): the strategy keeps no copy
and is handed them at every round, so every rank reasons with the weights it draws with. Whether a
proposal changes anything is the sampler's rule alone (weights quantised to multiples of 2^-32).

A subclass implements :meth:`MixingStrategy._raw_update`, which maps the pending snapshot and the current
weights to raw proposed weights plus an ``active`` mask (domains whose statistics were usable). The base class then
applies the guards, in this order (the maths lives in :mod:`megamix.simplex`):

1. **min count**: domains that are not active (fewer than ``cfg.min_count`` samples this round, or a
   non-finite score) keep their previous weight; active domains share the rest of the mass in the
   proportions the strategy proposed.
2. **fallback**: when the strategy cannot produce a usable update (``_raw_update`` returns None,
   e.g. ``Gp`` is zero or NaN) the previous weights are kept and the reason is logged in
   ``last_info["fallback"]``.
3. **EMA**: ``p ← ema·p_old + (1-ema)·p_new``.
4. **floor**: every weight is raised to ``min_weight``; the others are scaled down together,
   so their ratios are kept.

``ema`` and ``min_weight`` are ``cfg.ema`` / ``cfg.min_weight`` when set, else the strategy class's
``default_ema`` / ``default_min_weight`` (:meth:`MixingStrategy.guards`): ``rnb`` follows the paper
(0 and 0), ``rnb-damped`` is the damped variant (0.5 and 0.02).
5. **drift bound** (only with ``max_drift``, e.g. ``meta.max_drift`` of a Domain2Vec prior): the
   Euclidean projection onto ``{x : prior - max_drift <= x <= prior + max_drift, Σx = 1}`` (clipped
   to [0, 1]) that keeps the floor as a lower bound wherever the box allows it
   (:func:`megamix.simplex.bound_drift`). It comes last so that nothing after it can leave the box.
   When the floor and the box conflict, the box wins: a domain whose ``prior + max_drift`` is below
   the floor sits at ``prior + max_drift``, and if the floored domains would need more mass than the
   box leaves, the floor is lowered to the largest value that fits.

The result is a :func:`megamix.simplex.normalize` output, which the loader's normalisation leaves
bit for bit unchanged. The strategy keeps no weight history: the loader's (``Mixer.weight_history``) is
the one record.

A strategy that reweights each sample's *gradient* in-step instead of the sampling weights (DoGraph)
also implements the :class:`GradientReweighter` protocol; the Mixer holds it as ``Mixer.reweighter``.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from megamix import simplex
from megamix.snapshot import StatsSnapshot, from_jsonable, merge_snapshots, snapshot_from_dict, snapshot_to_dict, to_jsonable

log = logging.getLogger("megamix.strategies")

__all__ = ["MixingStrategy", "GradientReweighter", "keep_inactive", "no_signal"]


def no_signal(x, what: str) -> str | None:
    """Why the gradient statistics ``x`` cannot drive an update, or None when they can: they hold a NaN/Inf,
    or they are all zero (no gradient signal, e.g. a head without gradients). The one check the strategies
    share; the caller keeps the previous weights with this reason (``info["fallback"]``)."""
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        return f"{what} is not finite (NaN/inf gradient statistics)"
    if x.size == 0 or not np.any(x):
        return f"{what} is zero (no gradient signal)"
    return None


def keep_inactive(proposed: np.ndarray, previous: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Inactive domains keep ``previous``; active ones share the remaining mass like ``proposed``."""
    active = np.asarray(active, dtype=bool)
    previous = np.asarray(previous, np.float64)
    if active.all():
        return simplex.normalize(proposed)
    out = previous.copy()
    mass = 1.0 - previous[~active].sum()
    p = np.asarray(proposed, np.float64)[active]
    if p.sum() <= 0 or not np.all(np.isfinite(p)):
        return previous.copy()
    out[active] = mass * p / p.sum()
    return out


class MixingStrategy:
    """Base class: observe per-round statistics, propose new weights, save/restore state.

    Args:
        domain_names: the domains, in the order weights are indexed.
        initial_weights: starting distribution over ``domain_names``; also the prior of the drift bound.
        cfg: a :class:`megamix.config.MixingConfig`.
        max_drift: optional bound on ``|w_i - initial_weights_i|`` in every domain, enforced by
            :meth:`propose` as its last guard (see the module docstring); None = unbounded.
    """

    name: str = "base"
    #: EMA and floor used when ``cfg.ema`` / ``cfg.min_weight`` are None (null in YAML)
    default_ema: float = 0.0
    default_min_weight: float = 0.01
    #: whether the strategy needs ``snapshot.per_sample`` (DomainStats(keep_per_sample=True))
    needs_per_sample: bool = False

    def __init__(self, domain_names: Sequence[str], initial_weights, cfg, *, max_drift: float | None = None):
        names = list(domain_names)
        if not names:
            raise ValueError("a mixing strategy needs at least one domain")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate domain names: {names}")
        self.domain_names = names
        self.cfg = cfg
        w = simplex.normalize(initial_weights)
        if w.size != len(names):
            raise ValueError(f"{w.size} initial weights for {len(names)} domains")
        self.initial_weights = w
        self.max_drift = simplex.check_max_drift(max_drift)
        self.ema, self.min_weight = self.guards(cfg)
        self.rounds = 0
        self.last_info: dict = {}
        self._pending: StatsSnapshot | None = None

    @classmethod
    def guards(cls, cfg) -> tuple[float, float]:
        """``(ema, min_weight)`` this strategy applies under ``cfg`` (its defaults where cfg says None)."""
        ema = cls.default_ema if cfg.ema is None else float(cfg.ema)
        floor = cls.default_min_weight if cfg.min_weight is None else float(cfg.min_weight)
        return ema, floor

    # ------------------------------------------------------------------ interface
    def observe(self, snap: StatsSnapshot) -> None:
        """Record one round of all-reduced statistics (merged with any not yet used)."""
        if list(snap.domain_names) != self.domain_names:
            raise ValueError(f"snapshot domains {snap.domain_names} differ from the strategy's "
                             f"{self.domain_names}")
        d = len(self.domain_names)
        if snap.counts.shape != (d,) or snap.sums.ndim != 2 or snap.sums.shape[0] != d:
            raise ValueError(f"snapshot shapes counts {snap.counts.shape}, sums {snap.sums.shape} "
                             f"do not match {d} domains")
        if self.needs_per_sample and snap.per_sample is None:
            raise ValueError(f"strategy {self.name!r} needs per-sample gradients "
                             "(DomainStats(keep_per_sample=True)); the snapshot has none")
        self._pending = snap if self._pending is None else merge_snapshots(self._pending, snap)

    def propose(self, step: int, current) -> np.ndarray:
        """New weights over ``domain_names`` (sum 1, all >= 0) from the pending statistics and ``current``, the
        weights in force (the sampler's: the strategy keeps no copy of its own). ``current`` itself when nothing
        was observed."""
        current = np.asarray(current, dtype=np.float64)
        if current.shape != (len(self.domain_names),):
            raise ValueError(f"current weights have shape {current.shape}; expected ({len(self.domain_names)},)")
        if self._pending is None:
            return current.copy()
        snap, self._pending = self._pending, None
        info: dict = {"step": int(step), "round": self.rounds}
        new = self._update(snap, current.copy(), info)
        self.rounds += 1
        self.last_info = info
        return new

    def _update(self, snap: StatsSnapshot, prev: np.ndarray, info: dict) -> np.ndarray:
        """The guarded update (module docstring, steps 1-5) of :meth:`_raw_update`'s proposal; a subclass that
        does not propose domain weights (DoGraph) overrides this instead."""
        raw = self._raw_update(snap, prev, info)
        if raw is None:
            new = prev
            reason = info.get("fallback", "no usable statistics")
            info["fallback"] = reason
            log.warning("%s step %d: keeping previous weights (%s)", self.name, info["step"], reason)
        else:
            proposed, active = raw
            active = np.asarray(active, dtype=bool) & np.isfinite(proposed)
            if not active.any():
                info["fallback"] = "no domain had usable statistics this round"
                log.warning("%s step %d: keeping previous weights (%s)", self.name, info["step"],
                            info["fallback"])
                new = prev
            else:
                proposed = np.where(active, np.nan_to_num(proposed, nan=0.0), 0.0)
                info["kept_previous"] = [n for n, a in zip(self.domain_names, active) if not a]
                new = keep_inactive(proposed, prev, active)
                info["raw"] = new.tolist()
                new = simplex.ema(new, prev, self.ema)
        new = simplex.floor(new, self.min_weight)
        if self.max_drift is not None:
            new = simplex.bound_drift(new, self.initial_weights, self.max_drift, self.min_weight)
        return new

    def _raw_update(self, snap: StatsSnapshot, current: np.ndarray, info: dict
                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Return ``(proposed weights [D], active mask [D])`` from the round's statistics and the weights in force,
        or None to keep the previous weights (set ``info["fallback"]`` to say why)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _raw_update (or override _update)")

    # ------------------------------------------------------------------ helpers
    def count_mask(self, counts: np.ndarray) -> np.ndarray:
        """Domains with at least ``cfg.min_count`` (and at least one) samples this round."""
        return np.asarray(counts) >= max(1, int(self.cfg.min_count))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serialisable state: rounds, last info and any unused snapshot (the weights in force are the
        loader's, checkpointed with it)."""
        return {"name": self.name, "domain_names": list(self.domain_names),
                "initial_weights": self.initial_weights.tolist(),
                "rounds": self.rounds, "last_info": to_jsonable(self.last_info),
                "pending": None if self._pending is None else snapshot_to_dict(self._pending)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` output; the domains and strategy name must match."""
        if sd.get("name") != self.name:
            raise ValueError(f"state is for strategy {sd.get('name')!r}, not {self.name!r}")
        if list(sd["domain_names"]) != self.domain_names:
            raise ValueError(f"state domains {sd['domain_names']} differ from {self.domain_names}")
        self.initial_weights = np.asarray(sd["initial_weights"], dtype=np.float64)
        self.rounds = int(sd["rounds"])
        self.last_info = from_jsonable(sd.get("last_info", {}))
        self._pending = None if sd.get("pending") is None else snapshot_from_dict(sd["pending"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.domain_names)} domains, {self.rounds} rounds)"


class GradientReweighter:
    """The protocol of a strategy that weights every training sample's loss in-step by a factor of its
    projected gradient (DoGraph), held by the Mixer as ``Mixer.reweighter``.

    The decision it shares across ranks is a cluster table, packed into a fixed-size float64 buffer so that one
    broadcast carries it with the weights (:meth:`table_buffer` / :meth:`load_table_buffer`)."""

    @property
    def ready(self) -> bool:
        """Whether it has a table to weight with (False before its first round)."""
        raise NotImplementedError

    def sample_factors(self, g):
        """Unnormalised factor ``[B]`` of each projected per-sample gradient row ``g [B, k]`` (a device tensor)."""
        raise NotImplementedError

    def table_buffer(self, k: int) -> np.ndarray:
        """The decision as a float64 vector of a length that depends only on the config and ``k``."""
        raise NotImplementedError

    def load_table_buffer(self, buf: np.ndarray, k: int) -> None:
        """Install a decision packed by :meth:`table_buffer` (another rank's)."""
        raise NotImplementedError

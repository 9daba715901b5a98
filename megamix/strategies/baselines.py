"""Static baseline: the weights never change (natural / uniform / temperature / explicit / file
mixtures are built by :mod:`megamix.mixture` and passed in as ``initial_weights``)."""
from __future__ import annotations

import numpy as np

from megamix.snapshot import StatsSnapshot
from megamix.strategies.base import MixingStrategy

__all__ = ["StaticStrategy"]


class StaticStrategy(MixingStrategy):
    """Keeps ``initial_weights`` forever. Observed statistics are ignored (only validated), and the
    floor/EMA/drift guards are *not* applied: a static mixture is used exactly as given (it is the
    prior, so it is inside any drift bound)."""

    name = "static"

    def observe(self, snap: StatsSnapshot) -> None:
        if list(snap.domain_names) != self.domain_names:
            raise ValueError(f"snapshot domains {snap.domain_names} differ from {self.domain_names}")

    def propose(self, step: int, current) -> np.ndarray:
        self.rounds += 1
        return np.asarray(current, dtype=np.float64).copy()

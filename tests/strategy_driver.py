"""Drive a strategy the way the Mixer does: the weights in force (the sampler's, their one owner) are handed
to ``propose`` and replaced by what it returns."""
from __future__ import annotations

import weakref

import numpy as np

_IN_FORCE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def propose(strategy, step: int) -> np.ndarray:
    """``strategy.propose(step, current)`` with ``current`` the weights in force (initially its initial weights);
    the proposal becomes the weights in force, as the loader's ``set_weights`` makes it."""
    cur = _IN_FORCE.get(strategy, strategy.initial_weights)
    new = strategy.propose(step, cur)
    _IN_FORCE[strategy] = new.copy()
    return new


def in_force(strategy) -> np.ndarray:
    return _IN_FORCE.get(strategy, strategy.initial_weights).copy()

"""The one toolbox for domain-weight vectors: stateless functions on the probability simplex.

``Δ = {w ∈ R^D : w_i >= 0, Σ_i w_i = 1}``. Every function takes array-likes, works in float64,
returns a new ``np.ndarray`` (never a view of its input) and raises ``ValueError`` with a message
that names the offending domains when the input is malformed.

- :func:`normalize` ``w / Σw``; :func:`validate` checks ``w ∈ Δ`` without rescaling.
- :func:`softmax` maps scores to ``Δ``.
- :func:`ema` and :func:`floor` are the smoothing and minimum-weight guards of the online strategies.
- :func:`project` (onto ``Δ``) and :func:`project_capped` (onto ``Δ ∩ [lower, upper]``) are exact
  Euclidean projections.
- :func:`drift_box` and :func:`bound_drift` keep weights within ``prior ± max_drift``.
- Whether two weight vectors are the same mixture is the sampler's rule, not this module's
  (:meth:`megamix.loader.sampler.MixtureSampler.changes`: weights quantised to multiples of 2^-32).

Sums are taken with ``math.fsum`` (correctly rounded), so results are identical on every platform
and rank. This module imports nothing from megamix: the loader, the mixtures, the strategies and
Domain2Vec all build on it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["normalize", "validate", "softmax", "ema", "floor", "project", "project_capped",
           "check_max_drift", "drift_box", "bound_drift", "NORMALIZED_TOL"]

#: a vector whose fsum is within this of 1 counts as normalised: :func:`normalize` returns it as is.
#: ``x / fsum(x)`` always sums to within about 2^-52 of 1, so this makes :func:`normalize` idempotent.
NORMALIZED_TOL = 2.0 ** -50


def _vector(w, num_domains: int | None = None, names: Sequence[str] | None = None) -> np.ndarray:
    """``w`` as a new 1-D float64 array, checked to be finite and >= 0 (length ``num_domains`` if given)."""
    try:
        arr = np.array(w, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"weights must be a sequence of numbers: {e}") from None
    if num_domains is not None and (arr.ndim != 1 or arr.size != num_domains):
        raise ValueError(f"expected {num_domains} weights (one per domain), got shape {arr.shape}")
    if arr.ndim != 1:
        raise ValueError(f"weights must be a 1-D vector, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("empty weight vector: need at least one domain")
    labels = list(names) if names is not None else [f"domain {i}" for i in range(arr.size)]
    if len(labels) != arr.size:
        raise ValueError(f"{len(labels)} names for {arr.size} weights")
    bad = [labels[i] for i in np.flatnonzero(~np.isfinite(arr))]
    if bad:
        raise ValueError(f"weights must be finite; NaN/inf for {bad}")
    neg = [f"{labels[i]}={arr[i]:g}" for i in np.flatnonzero(arr < 0)]
    if neg:
        raise ValueError(f"weights must be >= 0; negative: {neg}")
    return arr


def _fsum(arr: np.ndarray) -> float:
    return math.fsum(arr.tolist())


def normalize(w, num_domains: int | None = None, names: Sequence[str] | None = None) -> np.ndarray:
    """``w / Σ_i w_i`` as float64, with ``Σ`` the correctly rounded sum (``math.fsum``).

    A vector that already sums to 1 within :data:`NORMALIZED_TOL` is returned unchanged (a copy), so
    ``normalize(normalize(w)) == normalize(w)`` bit for bit: weights that went through ``normalize``
    once (in a strategy) keep their exact bits when normalised again (by the loader).

    Raises ``ValueError`` for a non-numeric, non-1-D or empty input, a wrong length (``num_domains``),
    NaN/inf, a negative entry, or all zeros. ``names`` label the domains in the messages.
    """
    arr = _vector(w, num_domains, names)
    total = _fsum(arr)
    if not total > 0:
        raise ValueError("weights are all zero; at least one domain needs a positive weight")
    if abs(total - 1.0) <= NORMALIZED_TOL:
        return arr
    return arr / total


def validate(w, num_domains: int | None = None, names: Sequence[str] | None = None,
             atol: float = 1e-6) -> np.ndarray:
    """Check that ``w ∈ Δ``: finite, >= 0 and ``|Σ w - 1| <= atol``. Returns it as float64, unscaled.

    Raises ``ValueError`` (same checks as :func:`normalize`, plus the sum).
    """
    arr = _vector(w, num_domains, names)
    total = _fsum(arr)
    if abs(total - 1.0) > atol:
        raise ValueError(f"weights must sum to 1 (they sum to {total:.8g})")
    return arr


def softmax(x) -> np.ndarray:
    """``softmax(x)_i = exp(x_i - max x) / Σ_j exp(x_j - max x)`` of a 1-D array (numerically stable)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - x.max())
    return z / z.sum()


def ema(new, old, decay: float) -> np.ndarray:
    """Exponential moving average on ``Δ``: ``normalize(decay·old + (1 - decay)·new)``, ``0 <= decay < 1``.

    ``decay = 0`` returns ``new``; a convex combination of distributions is a distribution.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"ema decay must be in [0, 1), got {decay}")
    return normalize(decay * np.asarray(old, np.float64) + (1.0 - decay) * np.asarray(new, np.float64))


def floor(w, min_weight: float) -> np.ndarray:
    """Raise every weight to at least ``min_weight`` while keeping ``Σ = 1`` and the others' ratios.

    With ``F`` the set of floored domains, ``x_i = m`` for ``i ∈ F`` and
    ``x_j = (1 - m·|F|) · w_j / Σ_{k∉F} w_k`` otherwise; ``F`` grows (domains that the rescaling
    pushed below ``m`` join it) until no free domain is below ``m``. ``min_weight <= 0`` only
    normalises. Raises ``ValueError`` when ``D·min_weight > 1`` (no distribution satisfies the floor).
    """
    w = normalize(w)
    d = w.size
    if min_weight <= 0:
        return w
    if d * min_weight > 1 + 1e-12:
        raise ValueError(f"min_weight={min_weight} is infeasible for {d} domains "
                         f"(needs min_weight <= 1/{d} = {1 / d:.4g})")
    out = w.copy()
    fixed = np.zeros(d, dtype=bool)
    for _ in range(d + 1):
        low = (out < min_weight - 1e-15) & ~fixed
        if not low.any():
            break
        fixed |= low
        free = ~fixed
        remaining = 1.0 - min_weight * fixed.sum()
        out[fixed] = min_weight
        if free.any():
            base = w[free]
            out[free] = remaining * base / base.sum() if base.sum() > 0 else remaining / free.sum()
    return normalize(out)


def project(v) -> np.ndarray:
    """Euclidean projection ``argmin_{x ∈ Δ} ‖x - v‖``.

    Sort-based (Held et al. 1974; Duchi et al. 2008): with ``u`` the entries of ``v`` in decreasing
    order and ``ρ = max{j : u_j - (Σ_{i<=j} u_i - 1)/j > 0}``, ``θ = (Σ_{i<=ρ} u_i - 1)/ρ`` and
    ``x = max(v - θ, 0)``. Raises ``ValueError`` for an empty or non-finite ``v``.
    """
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("simplex projection needs a non-empty finite vector")
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def project_capped(y, upper=None, lower=None, iters: int = 100) -> np.ndarray:
    """Euclidean projection ``argmin ‖x - y‖`` over ``{x : lower <= x <= upper, Σx = 1}``.

    The KKT conditions give ``x = clip(y - τ, lower, upper)`` with the scalar ``τ`` chosen so that
    ``Σx = 1``; ``Σ clip(y - τ, lower, upper)`` is non-increasing in ``τ``, so ``τ`` is found by
    bisection (``iters`` halvings), and the tiny residual is spread over coordinates strictly inside
    their bounds. ``lower`` defaults to 0 and ``upper`` to 1. Raises ``ValueError`` when the set is
    empty (``Σlower > 1``, ``Σupper < 1`` or ``lower > upper`` somewhere).
    """
    y = np.asarray(y, np.float64)
    lo = np.zeros_like(y) if lower is None else np.asarray(lower, np.float64)
    hi = np.ones_like(y) if upper is None else np.asarray(upper, np.float64)
    if lo.sum() > 1 + 1e-9 or hi.sum() < 1 - 1e-9 or np.any(lo > hi + 1e-12):
        raise ValueError(f"empty feasible set: Σlower={lo.sum():.4g}, Σupper={hi.sum():.4g}")
    a, b = float((y - hi).min()) - 1.0, float((y - lo).max()) + 1.0
    for _ in range(iters):
        t = 0.5 * (a + b)
        if np.clip(y - t, lo, hi).sum() > 1.0:
            a = t
        else:
            b = t
    x = np.clip(y - 0.5 * (a + b), lo, hi)
    resid = 1.0 - x.sum()
    free = (x > lo + 1e-15) & (x < hi - 1e-15)
    if abs(resid) > 0 and free.any():
        x[free] += resid / free.sum()
        x = np.clip(x, lo, hi)
    return x


def check_max_drift(max_drift) -> float | None:
    """``max_drift`` as a float in ``(0, 1]``, or None (no bound). Raises ``ValueError`` otherwise."""
    if max_drift is None:
        return None
    try:
        md = float(max_drift)
    except (TypeError, ValueError):
        raise ValueError(f"max_drift must be a number in (0, 1] or None (got {max_drift!r})") from None
    if not (0 < md <= 1 and math.isfinite(md)):
        raise ValueError(f"max_drift must be in (0, 1] or None (got {max_drift})")
    return md


def drift_box(prior, max_drift: float) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` with ``lo = max(0, prior - max_drift)``, ``hi = min(1, prior + max_drift)``.

    ``lo <= prior <= hi`` and ``prior ∈ Δ``, so ``Σlo <= 1 <= Σhi``: the box always meets ``Δ``.
    """
    p = normalize(prior)
    md = check_max_drift(max_drift)
    if md is None:
        raise ValueError("drift_box needs a max_drift")
    return np.maximum(0.0, p - md), np.minimum(1.0, p + md)


def bound_drift(w, prior, max_drift: float, min_weight: float = 0.0) -> np.ndarray:
    """The point of ``Δ ∩ [lo, hi]`` (see :func:`drift_box`) nearest to ``w``, keeping a floor.

    The lower bound is ``ℓ_i = clip(f, lo_i, hi_i)``: the floor ``f`` where the box allows it, else
    the nearest end of the box. ``f = min_weight`` unless ``Σ_i clip(min_weight, lo_i, hi_i) > 1``
    (the floor and the box conflict: the prior keeps some domain far above the floor, leaving too
    little mass for the others); then ``f`` is the largest value in ``[0, min_weight]`` with
    ``Σ_i clip(f, lo_i, hi_i) <= 1`` (found by bisection). So the drift bound always holds, and the
    floor holds in every domain where both can. The result is
    ``normalize(project_capped(w, upper=hi, lower=ℓ))``; a ``w`` already inside is returned unchanged.
    """
    x = normalize(w)
    lo, hi = drift_box(prior, max_drift)
    if lo.shape != x.shape:
        raise ValueError(f"{x.size} weights for a prior over {lo.size} domains")

    def lower(f: float) -> np.ndarray:
        return np.minimum(np.maximum(f, lo), hi)

    f = max(0.0, float(min_weight))
    if f > 0 and _fsum(lower(f)) > 1.0:
        a, b = 0.0, f  # Σ lower(a) <= 1 < Σ lower(b)
        for _ in range(100):
            mid = 0.5 * (a + b)
            if _fsum(lower(mid)) > 1.0:
                b = mid
            else:
                a = mid
        f = a
    lb = lower(f)
    if np.all(x >= lb) and np.all(x <= hi):
        return x
    return normalize(project_capped(x, upper=hi, lower=lb))


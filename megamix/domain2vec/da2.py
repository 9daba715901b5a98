"""DA² (Distribution Alignment Assumption): pick the mixture r whose meta-domain distribution
``r @ V_train`` is closest to the validation set's ``v_valid``.

Conventions: ``V`` is ``[m, n]`` with one **row** per training domain (m domains, n meta-domains).
Feasible mixtures satisfy ``r >= 0``, ``Σ r = 1`` and the data-amount constraint
``total_tokens · r_i <= tokens_i · epochs`` (paper §4.2), i.e. ``r_i <= caps_i`` (see :func:`data_caps`).

Two solvers:

- :func:`solve_exact`: the convex problem solved directly (SLSQP with analytic gradients; ``pgd`` =
  accelerated projected gradient with exact projection onto the capped simplex,
  :func:`megamix.simplex.project_capped`; ``linprog`` for L1).
- :func:`dirichlet_search`: the paper's procedure, K candidates (default 100k) from a Dirichlet around
  the token distribution, infeasible ones rejected, the top-k (default 100) averaged. It takes any
  vectorised objective, so Domain2Vec+RegMix reuses it.

Distances (``distance=``): ``huber`` (the paper's choice: mean Huber loss over the n components),
``l2`` (Euclidean), ``l1``, ``kl`` (KL(v_valid ‖ r@V)), ``js`` (Jensen-Shannon).

Huber δ. The Huber loss is ½d² for |d| ≤ δ and δ(|d| − ½δ) beyond. Both vectors are probability
distributions, so every component difference is at most 1 in absolute value: with δ = 1 (the torch
and sklearn default; the paper does not state its δ) the loss is exactly ½·MSE and Huber is just L2.
:func:`huber_delta_auto` picks δ from the data instead: the median of the component differences
``|(r @ V_train − v_valid)_j|`` over the Dirichlet candidate mixtures (10k draws of the search's α),
so half of the components fall in the quadratic part and half in the linear part. The CLI uses it by
default (``--delta auto``) and records δ and the quantiles of the differences.

Dirichlet α (:func:`search_alpha`): ``scaled`` (default) is ``α = m · a_train`` (``a_train`` = token
shares, so uniform token shares give the uniform distribution on the simplex); ``paper`` is the
paper's literal ``Dirichlet(a_train)`` (α sums to 1: nearly every draw is close to a single domain).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from megamix.configbase import ConfigError
from megamix.data.errors import DataError
from megamix.simplex import normalize, project_capped

__all__ = ["DISTANCES", "ALPHA_KINDS", "distance", "distance_batch", "data_caps", "solve_exact",
           "dirichlet_search", "dirichlet_alpha", "search_alpha", "huber_delta_auto", "Da2Result",
           "check_inputs"]

DISTANCES = ("huber", "l2", "l1", "kl", "js")
ALPHA_KINDS = ("scaled", "paper")
_EPS = 1e-10


@dataclass
class Da2Result:
    """A chosen mixture with its objective value and diagnostics."""

    weights: np.ndarray
    value: float
    method: str
    info: dict = field(default_factory=dict)


def check_inputs(V: np.ndarray, v: np.ndarray, domains: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``V [m, n]`` and ``v [n]`` as float64."""
    V = np.asarray(V, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if V.ndim != 2 or V.shape[0] == 0 or V.shape[1] == 0:
        raise ValueError(f"V_train must be a non-empty [m, n] matrix (got shape {V.shape})")
    if v.ndim != 1 or v.shape[0] != V.shape[1]:
        raise ValueError(f"v_valid has shape {v.shape} but V_train has {V.shape[1]} meta-domains")
    if domains is not None and len(domains) != V.shape[0]:
        raise ValueError(f"{len(domains)} domain names but V_train has {V.shape[0]} rows")
    if not (np.all(np.isfinite(V)) and np.all(np.isfinite(v))):
        raise ValueError("V_train and v_valid must be finite")
    if np.any(V < -1e-9) or np.any(v < -1e-9):
        raise ValueError("domain vectors must be non-negative distributions")
    return V, v


def _huber(d: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(d)
    return np.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))


def distance_batch(P: np.ndarray, v: np.ndarray, kind: str = "huber", delta: float = 1.0) -> np.ndarray:
    """Distance between each row of ``P [K, n]`` and ``v [n]``."""
    P = np.atleast_2d(P)
    if kind == "huber":
        return _huber(P - v, delta).mean(axis=1)
    if kind == "l2":
        return np.sqrt(((P - v) ** 2).sum(axis=1))
    if kind == "l1":
        return np.abs(P - v).sum(axis=1)
    if kind == "kl":
        return (v * (np.log(v + _EPS) - np.log(P + _EPS))).sum(axis=1)
    if kind == "js":
        M = 0.5 * (P + v)
        return 0.5 * (P * (np.log(P + _EPS) - np.log(M + _EPS))).sum(axis=1) + \
            0.5 * (v * (np.log(v + _EPS) - np.log(M + _EPS))).sum(axis=1)
    raise ValueError(f"unknown distance {kind!r}; choose one of {DISTANCES}")


def distance(p: np.ndarray, v: np.ndarray, kind: str = "huber", delta: float = 1.0) -> float:
    """Distance between two vectors (see module docstring)."""
    return float(distance_batch(np.asarray(p, np.float64)[None], np.asarray(v, np.float64), kind, delta)[0])


def _smooth_obj(kind: str, V: np.ndarray, v: np.ndarray, delta: float):
    """(f, grad) in r of a smooth objective with the same minimisers as ``distance``."""
    n = V.shape[1]

    def f(r):
        p = r @ V
        if kind == "huber":
            return float(_huber(p - v, delta).mean())
        if kind == "l2":
            return float(((p - v) ** 2).sum())
        return float(distance_batch(p[None], v, kind, delta)[0])

    def g(r):
        p = r @ V
        if kind == "huber":
            gp = np.clip(p - v, -delta, delta) / n
        elif kind == "l2":
            gp = 2 * (p - v)
        elif kind == "kl":
            gp = -v / (p + _EPS)
        elif kind == "js":
            m = 0.5 * (p + v)
            gp = 0.5 * (np.log(p + _EPS) - np.log(m + _EPS))
        else:
            raise ValueError(kind)
        return V @ gp

    return f, g


def data_caps(tokens: np.ndarray | None, total_tokens: float | None, epochs: float = 1.0) -> np.ndarray | None:
    """Per-domain upper bounds ``caps_i = tokens_i · epochs / total_tokens`` (None = unconstrained).

    Raises ``ValueError`` when the caps make the problem infeasible (``Σ caps < 1``).
    """
    if tokens is None or total_tokens is None or total_tokens <= 0:
        return None
    tokens = np.asarray(tokens, np.float64)
    if np.any(tokens < 0):
        raise ValueError("token counts must be >= 0")
    if epochs <= 0:
        raise ConfigError(f"epochs (--epochs) must be > 0 (got {epochs})")
    caps = np.minimum(1.0, tokens * epochs / float(total_tokens))
    if caps.sum() < 1.0 - 1e-9:
        raise ConfigError(f"infeasible data-amount constraint: training on {total_tokens:.3g} tokens with at "
                          f"most {epochs} epoch(s) needs {total_tokens / epochs:.3g} tokens but the domains "
                          f"hold {tokens.sum():.3g}; lower total_tokens (--total-tokens, --proxy-steps) or raise "
                          "epochs (--epochs)")
    return caps


def _start(m: int, caps: np.ndarray | None) -> np.ndarray:
    return project_capped(np.full(m, 1.0 / m), caps)


def _solve_l1(V, v, caps):
    from scipy.optimize import linprog

    m, n = V.shape
    # variables [r (m), t (n)]; min Σt  s.t.  Vᵀr - v <= t,  v - Vᵀr <= t,  Σr = 1
    c = np.concatenate([np.zeros(m), np.ones(n)])
    A = np.block([[V.T, -np.eye(n)], [-V.T, -np.eye(n)]])
    b = np.concatenate([v, -v])
    ub = caps if caps is not None else np.ones(m)
    bounds = [(0.0, float(u)) for u in ub] + [(0.0, None)] * n
    res = linprog(c, A_ub=A, b_ub=b, A_eq=np.concatenate([np.ones(m), np.zeros(n)])[None], b_eq=[1.0],
                  bounds=bounds, method="highs")
    if not res.success:
        raise RuntimeError(f"L1 linear program failed: {res.message}")
    return project_capped(res.x[:m], caps), {"status": res.message}


def _solve_pgd(f, g, x0, caps, iters=5000, tol=1e-10):
    """FISTA with backtracking, adaptive restart and exact projection onto the capped simplex.
    Stops when a plain projected-gradient step from the iterate moves it by less than ``tol``."""
    x = x0.copy()
    fx = f(x)
    yk, tk, L = x.copy(), 1.0, 1.0
    for it in range(iters):
        gy, fy = g(yk), f(yk)
        while True:
            xn = project_capped(yk - gy / L, caps)
            d = xn - yk
            fxn = f(xn)
            if fxn <= fy + gy @ d + 0.5 * L * (d @ d) + 1e-15:
                break
            L *= 2.0
        if fxn > fx:  # adaptive restart: drop the momentum
            if tk == 1.0:  # a plain projected-gradient step cannot descend: converged
                return x, {"iters": it + 1}
            yk, tk = x.copy(), 1.0
            continue
        tn = 0.5 * (1 + np.sqrt(1 + 4 * tk * tk))
        yk = xn + ((tk - 1) / tn) * (xn - x)
        step = np.abs(xn - x).max()
        x, fx, tk = xn, fxn, tn
        if step < tol:
            return x, {"iters": it + 1}
    return x, {"iters": iters}


def solve_exact(V: np.ndarray, v: np.ndarray, distance_kind: str = "huber", *, caps: np.ndarray | None = None,
                delta: float = 1.0, method: str = "slsqp") -> Da2Result:
    """Exact minimiser of ``Dist(r @ V, v)`` over the (capped) simplex.

    ``method``: ``slsqp`` (scipy) or ``pgd`` (accelerated projected gradient). L1 always uses an LP.
    SLSQP falls back to PGD when it reports failure.
    """
    V, v = check_inputs(V, v)
    if distance_kind not in DISTANCES:
        raise ValueError(f"unknown distance {distance_kind!r}; choose one of {DISTANCES}")
    m = V.shape[0]
    if caps is not None:
        caps = np.asarray(caps, np.float64)
        if caps.shape != (m,):
            raise ValueError(f"caps has shape {caps.shape}, expected ({m},)")
        if caps.sum() < 1 - 1e-9:
            raise ValueError(f"infeasible caps: they sum to {caps.sum():.4g} < 1")
    if distance_kind == "l1":
        r, info = _solve_l1(V, v, caps)
        return Da2Result(r, distance(r @ V, v, "l1"), "linprog", info)
    f, g = _smooth_obj(distance_kind, V, v, delta)
    x0 = _start(m, caps)
    ub = caps if caps is not None else np.ones(m)
    info: dict = {}
    if method == "slsqp":
        from scipy.optimize import minimize

        # scale the objective so SLSQP's absolute tolerances are meaningful
        s = 1.0 / max(1e-12, float(np.abs(g(x0)).max()))
        res = minimize(lambda r: s * f(r), x0, jac=lambda r: s * g(r), method="SLSQP",
                       bounds=[(0.0, float(u)) for u in ub],
                       constraints=[{"type": "eq", "fun": lambda r: r.sum() - 1.0,
                                     "jac": lambda r: np.ones_like(r)}],
                       options={"maxiter": 1000, "ftol": 1e-14})
        r = project_capped(res.x, caps)
        info = {"success": bool(res.success), "message": str(res.message), "nit": int(res.nit)}
        if not res.success:
            r2, inf2 = _solve_pgd(f, g, x0, caps)
            if f(r2) <= f(r):
                r, info = r2, {**info, "fallback": "pgd", **inf2}
            method = "slsqp+pgd"
    elif method == "pgd":
        r, info = _solve_pgd(f, g, x0, caps)
    else:
        raise ValueError(f"method must be slsqp or pgd (got {method!r})")
    return Da2Result(r, distance(r @ V, v, distance_kind, delta), method, info)


def dirichlet_alpha(tokens: np.ndarray | None, m: int, concentration: float = 1.0,
                    floor: float = 1e-3) -> np.ndarray:
    """Dirichlet parameters ``α = concentration · m · a`` with ``a`` the token distribution (uniform
    when ``tokens`` is None). ``concentration=1`` with uniform tokens is the uniform distribution on
    the simplex; ``concentration=1/m`` is the paper's literal ``Dirichlet(a_train)``."""
    if tokens is None:
        a = np.full(m, 1.0 / m)
    else:
        try:
            a = normalize(tokens, m)
        except ValueError as e:
            raise DataError(f"token counts must be {m} non-negative numbers with a positive sum: {e}; check the "
                            "vectors' train_tokens (rerun `megamix d2v vectorize`)") from None
    if concentration <= 0:
        raise ConfigError(f"concentration (--concentration) must be > 0 (got {concentration})")
    return np.maximum(concentration * m * a, floor)


def search_alpha(tokens: np.ndarray | None, m: int, kind: str = "scaled",
                 concentration: float = 1.0) -> np.ndarray:
    """The Dirichlet parameters of the candidate search (see the module docstring).

    ``scaled``: ``α = concentration · m · a_train``. ``paper``: ``α = a_train`` exactly, the paper's
    ``Dirichlet(a_train)`` (``concentration`` must stay 1)."""
    if kind == "scaled":
        return dirichlet_alpha(tokens, m, concentration)
    if kind == "paper":
        if concentration != 1.0:
            raise ConfigError("the paper's Dirichlet(a_train) has no concentration; use --concentration "
                              "only with --dirichlet scaled")
        return dirichlet_alpha(tokens, m, 1.0 / m)
    raise ValueError(f"Dirichlet α must be one of {ALPHA_KINDS} (got {kind!r})")


def huber_delta_auto(V: np.ndarray, v: np.ndarray, alpha: np.ndarray, *, n_samples: int = 10_000,
                     seed: int = 0, quantile: float = 0.5) -> tuple[float, dict]:
    """δ for the Huber DA² distance: the ``quantile`` (default median) of the component differences
    ``|(r @ V − v)_j|`` over ``n_samples`` mixtures drawn from ``Dirichlet(alpha)``.

    Returns ``(delta, stats)`` with the quantiles of the differences and the fraction of components
    in the linear part at this δ and at δ = 1."""
    V, v = check_inputs(V, v)
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1) (got {quantile})")
    R = np.random.default_rng(seed).dirichlet(np.asarray(alpha, np.float64), size=n_samples)
    d = np.abs(R @ V - v).ravel()
    delta = float(np.quantile(d, quantile))
    if not delta > 0:
        raise ConfigError("the candidate mixtures all match v_valid exactly; pass an explicit --delta")
    qs = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    stats = {"rule": f"quantile {quantile} of |(r @ V_train - v_valid)_j| over {n_samples} Dirichlet(alpha) "
                     f"draws (seed {seed})",
             "abs_diff_quantiles": {f"p{int(q * 100)}": float(np.quantile(d, q)) for q in qs},
             "abs_diff_max": float(d.max()), "linear_fraction": float(np.mean(d > delta)),
             "linear_fraction_at_delta_1": float(np.mean(d > 1.0))}
    return delta, stats


def dirichlet_search(objective: Callable[[np.ndarray], np.ndarray], alpha: np.ndarray, *,
                     n_samples: int = 100_000, top_k: int = 100, caps: np.ndarray | None = None,
                     seed: int = 0, chunk: int = 20_000, progress: bool = False) -> Da2Result:
    """The paper's search: sample ``n_samples`` mixtures from ``Dirichlet(alpha)``, reject those that
    break ``r <= caps``, score them with ``objective(R [K, m]) -> [K]`` (lower is better) and return the
    mean of the ``top_k`` best. The mean of feasible points is feasible (the constraints are convex).
    """
    alpha = np.asarray(alpha, np.float64)
    if n_samples < 1 or top_k < 1:
        raise ConfigError(f"n_samples and top_k (--samples, --top-k) must be >= 1 (got {n_samples}, {top_k})")
    rng = np.random.default_rng(seed)
    best_R = np.zeros((0, len(alpha)))
    best_f = np.zeros(0)
    n_feasible = 0
    starts = range(0, n_samples, chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="dirichlet search", unit="chunk")
    for s in starts:
        R = rng.dirichlet(alpha, size=min(chunk, n_samples - s))
        R = R[np.all(np.isfinite(R), axis=1)]
        if caps is not None:
            R = R[np.all(R <= caps[None, :] + 1e-12, axis=1)]
        if len(R) == 0:
            continue
        n_feasible += len(R)
        fv = np.asarray(objective(R), np.float64)
        allR = np.concatenate([best_R, R])
        allf = np.concatenate([best_f, fv])
        keep = np.argsort(allf, kind="stable")[:top_k]
        best_R, best_f = allR[keep], allf[keep]
    if n_feasible == 0:
        raise ConfigError(f"none of the {n_samples} Dirichlet samples satisfied the data-amount caps "
                          f"{np.round(caps, 4).tolist() if caps is not None else None}; raise epochs (--epochs), "
                          "lower total_tokens (--total-tokens), raise n_samples (--samples) or the Dirichlet "
                          "concentration (--concentration)")
    r = best_R.mean(axis=0)
    r = r / r.sum()
    return Da2Result(r, float(objective(r[None])[0]), "dirichlet",
                     {"n_samples": n_samples, "n_feasible": int(n_feasible), "top_k": int(len(best_f)),
                      "best_sample_value": float(best_f[0]), "topk_values_mean": float(best_f.mean()),
                      "seed": seed})


def da2_objective(V: np.ndarray, v: np.ndarray, kind: str = "huber", delta: float = 1.0):
    """Vectorised DA² objective ``R [K, m] -> Dist(R @ V, v) [K]`` for :func:`dirichlet_search`."""
    V, v = check_inputs(V, v)
    return lambda R: distance_batch(np.asarray(R) @ V, v, kind, delta)


__all__.append("da2_objective")

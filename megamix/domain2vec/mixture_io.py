"""Writing Domain2Vec results as a mixture file (docs/interfaces.md, "Mixture files").

Format::

    {"domains": [..], "weights": {domain: w}, "method": "da2" | "d2v_regmix",
     "meta": {"distance": .., "solver": .., "objective": .., "caps": {..}, "max_drift": 0.1 | null, ...}}

``meta.max_drift`` (optional, float in (0, 1] or null): the largest per-domain deviation
``|w_online_i - w_prior_i|`` that an online strategy starting from this prior should allow. For runs
that start from this prior (``mixture.kind=file``) the Mixer reads it
(:func:`megamix.mixture.prior_max_drift`) and hands it to the strategy, whose last guard projects
every update onto ``{x : max(0, prior - max_drift) <= x <= prior + max_drift, Σx = 1}``
(:func:`megamix.simplex.bound_drift`). Null means unbounded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megamix.simplex import check_max_drift, normalize

__all__ = ["mixture_dict", "write_mixture", "read_mixture_weights"]


def mixture_dict(domains: list[str], weights, method: str, meta: dict | None = None,
                 max_drift: float | None = None) -> dict:
    """Build a validated mixture object (weights renormalised to sum exactly 1)."""
    w = np.asarray(weights, np.float64)
    if len(domains) == 0:
        raise ValueError("a mixture needs at least one domain")
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domain names in {domains}")
    if w.shape != (len(domains),):
        raise ValueError(f"{len(domains)} domains but weights have shape {w.shape}")
    w = normalize(np.where((w < 0) & (w >= -1e-9), 0.0, w), names=domains)  # solver round-off -> 0
    m = dict(meta or {})
    m["max_drift"] = check_max_drift(max_drift)
    return {"domains": list(domains), "weights": {d: float(x) for d, x in zip(domains, w)},
            "method": method, "meta": _jsonable(m)}


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return o


def write_mixture(path: str | Path, domains: list[str], weights, method: str, meta: dict | None = None,
                  max_drift: float | None = None) -> dict:
    """Write the mixture JSON atomically and return the object."""
    obj = mixture_dict(domains, weights, method, meta, max_drift)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, p)
    return obj


def read_mixture_weights(path: str | Path, domains: list[str]) -> np.ndarray:
    """Weights of a mixture file in the order of ``domains`` (strict: same domain set)."""
    obj = json.loads(Path(path).read_text())
    if set(obj.get("domains", [])) != set(domains):
        raise ValueError(f"{path}: mixture domains {sorted(obj.get('domains', []))} differ from "
                         f"{sorted(domains)}")
    return np.asarray([obj["weights"][d] for d in domains], np.float64)

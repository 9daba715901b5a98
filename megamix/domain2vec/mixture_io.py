"""Writing Domain2Vec results as a mixture file (docs/interfaces.md, "Mixture files").

Format::

    {"domains": [..], "weights": {domain: w}, "method": "da2" | "d2v_regmix",
     "meta": {"distance": .., "solver": .., "objective": .., "caps": {..}, "max_drift": 0.1 | null, ...}}

``meta.max_drift`` (optional, float in (0, 1] or null): the largest per-domain deviation
``|w_online_i - w_prior_i|`` that an online strategy starting from this prior should allow. It is
enforced by the Mixer for runs that start from this prior (``mixture.kind=file``), by projecting
every proposal onto
``{x : max(0, prior - max_drift) <= x <= prior + max_drift, Σx = 1}`` with
:func:`megamix.domain2vec.da2.project_capped_simplex`. Null means unbounded.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

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
    if not np.all(np.isfinite(w)) or np.any(w < -1e-9) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero (got {w})")
    w = np.clip(w, 0, None)
    w = w / w.sum()
    if max_drift is not None and not (0 < max_drift <= 1 and math.isfinite(max_drift)):
        raise ValueError(f"max_drift must be in (0, 1] or None (got {max_drift})")
    m = dict(meta or {})
    m["max_drift"] = max_drift
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

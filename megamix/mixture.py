"""Mixture files and static mixtures.

A *mixture* is a weight per domain (all >= 0, summing to 1). This module builds the static
baselines (natural, uniform, temperature-scaled, explicit) and reads/writes mixture JSON files::

    {"domains": [..], "weights": {domain: w}, "method": "da2|regmix|natural|...", "meta": {...}}

Weights are always returned as a float64 ``np.ndarray`` aligned with the ``domain_names`` passed in.
Normalising and validating weight vectors is :mod:`megamix.simplex` (``normalize``, ``validate``).

This module is the one owner of the file format: building and validating a document (:func:`mixture_dict`),
writing one atomically (:func:`save_mixture` for a distribution, :func:`write_mixture` for a solver's output:
Domain2Vec writes ``"method": "da2"`` or ``"d2v_regmix"`` with its search details in ``meta``) and reading one
(:func:`load_mixture`, which validates it against the run's domains).

``meta.max_drift`` (optional, float in (0, 1] or null): the largest per-domain deviation
``|w_online_i - w_prior_i|`` that an online strategy starting from this prior should allow. For runs that start
from this prior (``mixture.kind=file``) the Mixer reads it (:func:`prior_max_drift`) and hands it to the
strategy, whose last guard projects every update onto
``{x : max(0, prior - max_drift) <= x <= prior + max_drift, Σx = 1}`` (:func:`megamix.simplex.bound_drift`).
Null (or absent) means unbounded.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megamix.io import atomic_write_json
from megamix.simplex import check_max_drift, normalize, validate

__all__ = ["natural_weights", "uniform_weights", "temperature_weights", "explicit_weights",
           "load_mixture", "save_mixture", "write_mixture", "mixture_dict", "initial_weights", "prior_max_drift",
           "weights_to_dict"]


def _sizes_array(sizes: Mapping[str, float] | Sequence[float] | np.ndarray,
                 domain_names: Sequence[str] | None) -> np.ndarray:
    if isinstance(sizes, Mapping):
        if domain_names is None:
            raise ValueError("sizes given as a mapping need domain_names to fix the order")
        missing = [d for d in domain_names if d not in sizes]
        if missing:
            raise ValueError(f"no size for domains {missing}")
        arr = np.array([float(sizes[d]) for d in domain_names], dtype=np.float64)
    else:
        arr = np.asarray(sizes, dtype=np.float64).reshape(-1)
        if domain_names is not None and len(arr) != len(domain_names):
            raise ValueError(f"{len(arr)} sizes for {len(domain_names)} domains")
    if arr.size == 0:
        raise ValueError("need at least one domain")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"domain sizes must be finite and >= 0, got {arr.tolist()}")
    return arr


def natural_weights(sizes, domain_names: Sequence[str] | None = None) -> np.ndarray:
    """Weights proportional to domain size (tokens or samples)."""
    return normalize(_sizes_array(sizes, domain_names))


def uniform_weights(num_domains: int) -> np.ndarray:
    """Equal weight on every domain."""
    if num_domains < 1:
        raise ValueError("need at least one domain")
    return np.full(num_domains, 1.0 / num_domains)


def temperature_weights(sizes, temperature: float, domain_names: Sequence[str] | None = None) -> np.ndarray:
    """``w ∝ size^(1/temperature)``: T=1 is natural, T→∞ tends to uniform (over non-empty domains)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    arr = _sizes_array(sizes, domain_names)
    out = np.zeros_like(arr)
    pos = arr > 0
    if not pos.any():
        raise ValueError("every domain has size 0")
    # in log space to avoid overflow for large sizes / small temperatures
    logw = np.log(arr[pos]) / temperature
    out[pos] = np.exp(logw - logw.max())
    return normalize(out)


def explicit_weights(weights: Mapping[str, float], domain_names: Sequence[str],
                     renormalize: bool = False) -> np.ndarray:
    """Weights from a ``{domain: w}`` mapping, aligned with ``domain_names``.

    Every key must be a known domain. Domains missing from the mapping get 0. With
    ``renormalize=False`` the weights must already sum to 1.
    """
    unknown = sorted(set(weights) - set(domain_names))
    if unknown:
        raise ValueError(f"mixture names unknown domains {unknown}; known: {list(domain_names)}")
    arr = np.array([float(weights.get(d, 0.0)) for d in domain_names], dtype=np.float64)
    return normalize(arr) if renormalize else validate(arr, len(domain_names), domain_names)


def weights_to_dict(domain_names: Sequence[str], w: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{domain: float(weight)}``."""
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.size != len(domain_names):
        raise ValueError(f"{arr.size} weights for {len(domain_names)} domains")
    return {d: float(x) for d, x in zip(domain_names, arr)}


def _mixture_names(domains: Sequence[str]) -> list[str]:
    names = list(domains)
    if not names:
        raise ValueError("a mixture needs at least one domain")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate domain names in {names}")
    return names


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


def _document(names: list[str], w: np.ndarray, method: str, meta: dict | None) -> dict:
    return {"domains": names, "weights": weights_to_dict(names, w), "method": str(method),
            "meta": _jsonable(dict(meta or {}))}


def mixture_dict(domains: Sequence[str], weights, method: str, meta: dict | None = None,
                 max_drift: float | None = None) -> dict:
    """A validated mixture document from a solver's weights: entries in ``[-1e-9, 0)`` (round-off) become 0 and
    the weights are renormalised to sum to 1; ``meta`` is made JSON-safe (numpy values to Python) and
    ``meta.max_drift`` is always recorded (null: unbounded)."""
    names = _mixture_names(domains)
    w = np.asarray(weights, np.float64)
    if w.shape != (len(names),):
        raise ValueError(f"{len(names)} domains but weights have shape {w.shape}")
    w = normalize(np.where((w < 0) & (w >= -1e-9), 0.0, w), names=names)  # solver round-off -> 0
    doc = _document(names, w, method, meta)
    doc["meta"]["max_drift"] = check_max_drift(max_drift)
    return doc


def save_mixture(path: str | os.PathLike, domain_names: Sequence[str], weights, method: str,
                 meta: dict | None = None) -> Path:
    """Write a mixture JSON atomically and return its path. ``weights`` must be a distribution."""
    names = _mixture_names(domain_names)
    w = validate(weights, len(names), names)
    return atomic_write_json(path, _document(names, w, method, meta), indent=2)


def write_mixture(path: str | os.PathLike, domains: Sequence[str], weights, method: str, meta: dict | None = None,
                  max_drift: float | None = None) -> dict:
    """Write a solver's mixture (:func:`mixture_dict`: round-off tolerated, ``meta.max_drift`` recorded)
    atomically and return the document. Domain2Vec's writer."""
    doc = mixture_dict(domains, weights, method, meta, max_drift)
    atomic_write_json(path, doc, indent=2)
    return doc


def load_mixture(path: str | os.PathLike, domain_names: Sequence[str] | None = None,
                 renormalize: bool = False) -> tuple[np.ndarray, dict]:
    """Read and validate a mixture JSON.

    Returns ``(weights aligned with domain_names, document)``. When ``domain_names`` is None the file's
    own ``domains`` order is used. The file must name exactly the given domains (a clear
    ``ValueError`` lists the differences). ``renormalize=True`` tolerates weights not summing to 1.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mixture file {p} not found")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("weights"), dict):
        raise ValueError(f"{p}: a mixture file needs a 'weights' mapping {{domain: weight}}")
    file_domains = list(doc.get("domains") or doc["weights"].keys())
    if set(file_domains) != set(doc["weights"]):
        raise ValueError(f"{p}: 'domains' and the keys of 'weights' differ")
    names = list(domain_names) if domain_names is not None else file_domains
    missing = sorted(set(names) - set(file_domains))
    extra = sorted(set(file_domains) - set(names))
    if missing or extra:
        raise ValueError(f"{p} does not match the training domains: missing {missing}, "
                         f"unknown {extra}")
    w = explicit_weights(doc["weights"], names, renormalize=renormalize)
    return w, doc


def initial_weights(mixture_cfg, domain_names: Sequence[str], sizes) -> np.ndarray:
    """Starting weights from a :class:`megamix.config.MixtureConfig` (kind natural/uniform/temperature/
    explicit/file). ``sizes`` are per-domain train sizes (tokens), as a mapping or aligned sequence."""
    kind = mixture_cfg.kind
    if kind == "natural":
        return natural_weights(sizes, domain_names)
    if kind == "uniform":
        return uniform_weights(len(domain_names))
    if kind == "temperature":
        return temperature_weights(sizes, mixture_cfg.temperature, domain_names)
    if kind == "explicit":
        return explicit_weights(mixture_cfg.weights, domain_names)
    if kind == "file":
        return load_mixture(mixture_cfg.file, domain_names)[0]
    raise ValueError(f"unknown mixture kind {kind!r}")


def prior_max_drift(mixture_cfg) -> float | None:
    """``meta.max_drift`` of the prior mixture file (``mixture.kind=file``), validated to (0, 1], or None
    (other kinds, or a file without one). The online strategy stays within prior ± max_drift."""
    if mixture_cfg.kind != "file":
        return None
    _, doc = load_mixture(mixture_cfg.file)
    try:
        return check_max_drift((doc.get("meta") or {}).get("max_drift"))
    except ValueError as e:
        raise ValueError(f"{mixture_cfg.file}: meta.{e}") from None

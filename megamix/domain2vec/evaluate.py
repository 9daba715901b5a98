"""Proxy training and evaluation of DA² / Domain2Vec+RegMix against real training runs.

:func:`make_trainer_fn` wraps ``megamix.train.loop.train`` as a ``train_fn`` for
:func:`megamix.domain2vec.regmix.run_proxies`: one small static-mixture run per mixture.
:func:`evaluate_predictions` trains proxies on a set of mixtures and reports how well DA² distances
(and, with enough runs, cross-validated Domain2Vec+RegMix predictions) rank the actual validation
losses (Spearman and Pearson; the paper reports Spearman 0.67 for DA² with Huber).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from megamix.domain2vec.da2 import DISTANCES, distance_batch
from megamix.domain2vec.regmix import D2VRegMix, domain_to_meta_losses, run_proxies
from megamix.domain2vec.vectorize import DomainVectors

__all__ = ["make_trainer_fn", "valid_objective", "evaluate_predictions", "correlations"]


def make_trainer_fn(base_cfg, out_root: str | Path, *, steps: int | None = None,
                    progress: bool = False) -> Callable[[dict[str, float], int], Any]:
    """A ``train_fn(weights, index)`` that trains a proxy with the real trainer.

    Every proxy copies ``base_cfg`` (a :class:`megamix.config.MegamixConfig`) with: the mixture as
    ``mixture.kind=explicit``, ``mixing.strategy=static``, gradient projection off, no checkpoints,
    no resume, evaluation only at the end, and ``train.out_dir=<out_root>/proxy_<index>``.
    """
    from megamix.train.loop import train

    root = Path(out_root)

    def train_fn(weights: dict[str, float], index: int):
        cfg = copy.deepcopy(base_cfg)
        s = sum(weights.values())
        cfg.data.domains = list(weights)
        cfg.mixture.kind = "explicit"
        cfg.mixture.weights = {d: float(w) / s for d, w in weights.items()}
        cfg.mixing.strategy = "static"
        cfg.projection.enabled = False
        cfg.train.resume = False
        cfg.train.checkpoint_every = 0
        cfg.train.eval_every = 0
        if steps is not None:
            cfg.train.steps = int(steps)
            cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, int(steps) // 10))
        cfg.train.out_dir = str(root / f"proxy_{index:04d}")
        return train(cfg, progress=progress, log_to_stdout=False)

    return train_fn


def valid_objective(valid_loss: dict[str, float], vectors: DomainVectors) -> float:
    """The validation loss DA² targets: ``Σ_d w_d L_d`` over the validation domains with the weights
    used to build ``v_valid`` (uniform by default)."""
    missing = [d for d in vectors.valid_domains if d not in valid_loss]
    if missing:
        raise ValueError(f"proxy result lacks validation losses for {missing}")
    return float(sum(w * valid_loss[d] for d, w in zip(vectors.valid_domains, vectors.valid_weights)))


def correlations(pred: np.ndarray, actual: np.ndarray) -> dict:
    """Spearman and Pearson correlation (with p-values) between predictions and actual values."""
    from scipy.stats import pearsonr, spearmanr

    pred, actual = np.asarray(pred, float), np.asarray(actual, float)
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(actual) == 0:
        return {"spearman": float("nan"), "pearson": float("nan"), "n": int(len(pred))}
    s, sp = spearmanr(pred, actual)
    p, pp = pearsonr(pred, actual)
    return {"spearman": float(s), "spearman_p": float(sp), "pearson": float(p), "pearson_p": float(pp),
            "n": int(len(pred))}


def evaluate_predictions(vectors: DomainVectors, mixtures: np.ndarray, train_fn, *,
                         labels: list[str] | None = None, delta: float = 1.0, cv_folds: int = 4,
                         cache_path: str | Path | None = None, seed: int = 0,
                         progress: bool = True) -> dict:
    """Train one proxy per mixture and correlate predictions with the actual validation objective.

    Returns ``{"da2": {distance: correlations}, "regmix_cv": correlations | None, "runs": [...]}``.
    ``regmix_cv`` is a ``cv_folds``-fold cross-validated Domain2Vec+RegMix prediction (needs >= 8 runs).
    """
    if vectors.v_valid is None:
        raise ValueError("the vectors have no validation vector; run `megamix d2v vectorize` with "
                         "validation domains")
    R = np.asarray(mixtures, np.float64)
    runs = run_proxies(R, train_fn, vectors.domains, cache_path=cache_path, progress=progress)
    actual = np.asarray([valid_objective(r.valid_loss, vectors) for r in runs])
    P = R @ vectors.V_train
    report: dict = {"da2": {}, "n_runs": len(runs)}
    for kind in DISTANCES:
        d = distance_batch(P, vectors.v_valid, kind, delta)
        report["da2"][kind] = correlations(d, actual)
    report["regmix_cv"] = None
    if len(runs) >= 8 and cv_folds >= 2 and len(vectors.valid_domains):
        L = np.asarray([[r.valid_loss[d] for d in vectors.valid_domains] for r in runs])
        Y = domain_to_meta_losses(L, vectors.V_valid, vectors.valid_weights)
        pred = np.zeros(len(R))
        folds = np.array_split(np.random.default_rng(seed).permutation(len(R)), cv_folds)
        for f in folds:
            tr = np.setdiff1d(np.arange(len(R)), f)
            mdl = D2VRegMix(vectors.V_train, seed=seed).fit(R[tr], Y[tr])
            pred[f] = mdl.predict(R[f], vectors.v_valid)
        report["regmix_cv"] = correlations(pred, actual)
    report["runs"] = [{"label": (labels[i] if labels else f"mix{i}"), "weights": r.weights,
                       "valid_objective": float(actual[i]), "valid_loss": r.valid_loss,
                       "da2_huber": float(distance_batch(P[i:i + 1], vectors.v_valid, "huber", delta)[0])}
                      for i, r in enumerate(runs)]
    return report


def save_report(report: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2))


__all__.append("save_report")

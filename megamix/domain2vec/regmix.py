"""Domain2Vec+RegMix: learn per-meta-domain validation loss as a function of the training
distribution ``x = r @ V_train`` from small proxy runs, then search mixtures for
``L_valid(r) = Σ_j q_j f_j(r @ V_train)`` with ``q = v_valid`` (paper eq. 6-7).

Per-meta-domain losses. The trainer reports one validation loss per *corpus domain* d. We map them to
meta-domains through the validation vectors by Bayes' rule: a validation passage of meta-domain j comes
from domain d with probability ``p(d | j) ∝ π_d V_valid[d, j]`` (π = the validation weights), so
``L_j = Σ_d p(d | j) L_d``. This is exact when the loss of a passage depends only on its domain.
Pass ``meta_loss_fn`` to :func:`run_proxies` instead when a proxy can evaluate its validation passages
grouped by meta-domain label directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from megamix.domain2vec.da2 import Da2Result, dirichlet_search
from megamix.simplex import validate

__all__ = ["ProxyRun", "run_proxies", "domain_to_meta_losses", "D2VRegMix", "sample_mixtures"]


@dataclass
class ProxyRun:
    """One proxy: its mixture and the per-domain validation losses it reached."""

    index: int
    weights: dict[str, float]
    valid_loss: dict[str, float]

    def to_json(self) -> dict:
        return {"index": self.index, "weights": self.weights, "valid_loss": self.valid_loss}


def sample_mixtures(m: int, count: int, alpha: np.ndarray | None = None, seed: int = 0,
                    caps: np.ndarray | None = None, max_tries: int = 1000) -> np.ndarray:
    """``count`` feasible mixtures from ``Dirichlet(alpha)`` (rejection on ``caps``), seeded."""
    alpha = np.ones(m) if alpha is None else np.asarray(alpha, np.float64)
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for _ in range(max_tries):
        R = rng.dirichlet(alpha, size=max(count, 16))
        if caps is not None:
            R = R[np.all(R <= caps[None] + 1e-12, axis=1)]
        out.extend(R)
        if len(out) >= count:
            return np.asarray(out[:count])
    raise ValueError(f"could not draw {count} mixtures within the data-amount caps")


def _losses_of(result: Any) -> Mapping[str, float]:
    if isinstance(result, Mapping):
        return result
    vl = getattr(result, "valid_loss", None)
    if not isinstance(vl, Mapping):
        raise TypeError("train_fn must return a mapping domain -> loss or an object with .valid_loss")
    return vl


def run_proxies(mixtures: np.ndarray, train_fn: Callable[[dict[str, float], int], Any], domains: list[str],
                *, cache_path: str | Path | None = None, progress: bool = True) -> list[ProxyRun]:
    """Train one proxy per mixture row with the injected ``train_fn(weights: {domain: w}, index)``,
    which returns per-domain validation losses (a mapping, or an object with ``.valid_loss`` such as
    ``megamix.train.loop.TrainResult``).

    With ``cache_path`` (jsonl), finished proxies are appended as they complete and reused on a rerun
    with the same mixtures, so long sweeps can resume.
    """
    R = np.asarray(mixtures, np.float64)
    if R.ndim != 2 or R.shape[1] != len(domains):
        raise ValueError(f"mixtures must be [M, {len(domains)}] (got {R.shape})")
    for i, row in enumerate(R):
        try:
            validate(row, names=domains)
        except ValueError as e:
            raise ValueError(f"each mixture must be non-negative and sum to 1; row {i}: {e}") from None
    done: dict[int, ProxyRun] = {}
    cache = Path(cache_path) if cache_path else None
    if cache and cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                o = json.loads(line)
                w = np.asarray([o["weights"].get(d, -1) for d in domains])
                if o["index"] < len(R) and np.allclose(w, R[o["index"]], atol=1e-9):
                    done[o["index"]] = ProxyRun(o["index"], o["weights"], o["valid_loss"])
    runs: list[ProxyRun] = []
    it = range(len(R))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="proxy runs", unit="run")
    for i in it:
        if i in done:
            runs.append(done[i])
            continue
        w = {d: float(x) for d, x in zip(domains, R[i])}
        vl = {str(k): float(v) for k, v in _losses_of(train_fn(w, i)).items()}
        bad = {k: v for k, v in vl.items() if not np.isfinite(v)}
        if bad:
            raise ValueError(f"proxy {i} returned non-finite losses {bad}")
        run = ProxyRun(i, w, vl)
        runs.append(run)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with cache.open("a") as f:
                f.write(json.dumps(run.to_json()) + "\n")
    return runs


def domain_to_meta_losses(losses: np.ndarray, V_valid: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """Map per-domain losses ``[M, D]`` to per-meta-domain losses ``[M, n]`` with
    ``p(d | j) ∝ prior_d V_valid[d, j]`` (see module docstring). Meta-domains that no validation domain
    covers get the prior-weighted mean loss."""
    losses = np.atleast_2d(np.asarray(losses, np.float64))
    V_valid = np.asarray(V_valid, np.float64)
    if losses.shape[1] != V_valid.shape[0]:
        raise ValueError(f"losses have {losses.shape[1]} domains but V_valid has {V_valid.shape[0]} rows")
    pi = np.full(V_valid.shape[0], 1.0 / V_valid.shape[0]) if prior is None else np.asarray(prior, np.float64)
    joint = pi[:, None] * V_valid  # [D, n]
    col = joint.sum(axis=0)
    post = np.where(col > 1e-12, joint / np.maximum(col, 1e-300), pi[:, None] / pi.sum())
    return losses @ post


class D2VRegMix:
    """One LightGBM regressor per meta-domain: ``f_j(x) ≈ L_j`` with ``x = r @ V_train``.

    Args:
        V_train: ``[m, n]`` training-domain vectors.
        lgbm_params: overrides for ``lightgbm.LGBMRegressor`` (defaults suit tens to thousands of proxies).
    """

    def __init__(self, V_train: np.ndarray, lgbm_params: dict | None = None, seed: int = 0):
        self.V = np.asarray(V_train, np.float64)
        self.seed = seed
        self.params = dict(lgbm_params or {})
        self.models: list = []
        self.const: np.ndarray | None = None

    def _make(self, n_rows: int):
        import lightgbm as lgb

        p = {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 15,
             "min_child_samples": max(2, min(20, n_rows // 10)), "subsample": 1.0,
             "colsample_bytree": 1.0, "reg_lambda": 1e-3, "random_state": self.seed, "n_jobs": 1,
             "deterministic": True, "force_row_wise": True, "verbose": -1, "min_data_in_bin": 1}
        p.update(self.params)
        return lgb.LGBMRegressor(**p)

    def fit(self, mixtures: np.ndarray, meta_losses: np.ndarray, progress: bool = False) -> "D2VRegMix":
        """Fit ``f_j`` on features ``mixtures @ V_train`` and targets ``meta_losses [M, n]``."""
        R = np.asarray(mixtures, np.float64)
        Y = np.asarray(meta_losses, np.float64)
        if R.ndim != 2 or R.shape[1] != self.V.shape[0]:
            raise ValueError(f"mixtures must be [M, {self.V.shape[0]}] (got {R.shape})")
        if Y.shape != (R.shape[0], self.V.shape[1]):
            raise ValueError(f"meta_losses must be [{R.shape[0]}, {self.V.shape[1]}] (got {Y.shape})")
        if R.shape[0] < 4:
            raise ValueError(f"need at least 4 proxy runs to fit the regressors (got {R.shape[0]})")
        X = R @ self.V
        self.models = []
        it = range(Y.shape[1])
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="fit LightGBM per meta-domain", unit="model")
        for j in it:
            mdl = self._make(len(X))
            mdl.fit(X, Y[:, j])
            self.models.append(mdl)
        return self

    def predict_meta(self, R: np.ndarray) -> np.ndarray:
        """Predicted per-meta-domain losses ``[K, n]`` for mixtures ``R [K, m]``."""
        if not self.models:
            raise RuntimeError("call fit() first")
        X = np.atleast_2d(np.asarray(R, np.float64)) @ self.V
        return np.stack([m.predict(X) for m in self.models], axis=1)

    def predict(self, R: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``L_valid(r) = Σ_j q_j f_j(r @ V)`` for each row of ``R``; only meta-domains with q_j > 0 run."""
        q = np.asarray(q, np.float64)
        if q.shape != (self.V.shape[1],):
            raise ValueError(f"q must have {self.V.shape[1]} entries (got {q.shape})")
        X = np.atleast_2d(np.asarray(R, np.float64)) @ self.V
        out = np.zeros(len(X))
        for j in np.where(q > 1e-12)[0]:
            out += q[j] * self.models[j].predict(X)
        return out

    def search(self, q: np.ndarray, alpha: np.ndarray, *, n_samples: int = 100_000, top_k: int = 100,
               caps: np.ndarray | None = None, seed: int = 0, progress: bool = False) -> Da2Result:
        """Dirichlet search + top-k average minimising the predicted ``L_valid``."""
        res = dirichlet_search(lambda R: self.predict(R, q), alpha, n_samples=n_samples, top_k=top_k,
                               caps=caps, seed=seed, progress=progress)
        res.method = "d2v_regmix"
        return res

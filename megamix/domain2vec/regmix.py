"""Domain2Vec+RegMix: learn per-meta-domain validation loss as a function of the training
distribution ``x = r @ V_train`` from small proxy runs, then search mixtures for
``L_valid(r) = Σ_j q_j f_j(r @ V_train)`` with ``q = v_valid`` (paper eq. 6-7).

Per-meta-domain losses ``L_j`` (the regression targets) are measured: every proxy is scored on the
validation documents behind ``v_valid`` and the document losses are grouped by meta-domain, by the
classifier's argmax (default) or weighted by its probabilities; see :mod:`megamix.domain2vec.metaloss`.
:func:`domain_to_meta_losses` keeps the earlier approach for comparison: it spreads the per-domain
losses over meta-domains by Bayes' rule, ``L_j = Σ_d p(d | j) L_d`` with
``p(d | j) ∝ π_d V_valid[d, j]``; then ``Σ_j q_j L_j = Σ_d π_d L_d`` exactly, so it is RegMix on
domain losses and carries no information about meta-domains beyond the domains.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from megamix.configbase import ConfigError
from megamix.domain2vec.da2 import Da2Result, dirichlet_search
from megamix.io import read_jsonl
from megamix.simplex import validate

__all__ = ["ProxyRun", "ProxyResult", "run_proxies", "domain_to_meta_losses", "D2VRegMix", "sample_mixtures"]


@dataclass
class ProxyResult:
    """What a proxy ``train_fn`` may return: per-domain validation losses and, when the proxy was
    scored on the validation documents, one loss per document."""

    valid_loss: dict[str, float]
    doc_loss: list[float] | None = None


@dataclass
class ProxyRun:
    """One proxy: its mixture, the per-domain validation losses it reached and (optionally) its loss
    on each validation document (``docs_sha`` fingerprints those documents). ``key`` describes how
    it was trained (budget, model, data)."""

    index: int
    weights: dict[str, float]
    valid_loss: dict[str, float]
    doc_loss: list[float] | None = None
    key: dict | None = None
    docs_sha: str | None = None

    def to_json(self) -> dict:
        o = {"index": self.index, "weights": self.weights, "valid_loss": self.valid_loss}
        if self.doc_loss is not None:
            o["doc_loss"] = self.doc_loss
            o["docs_sha"] = self.docs_sha
        if self.key is not None:
            o["key"] = self.key
        return o


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
    raise ConfigError(f"could not draw {count} mixtures within the data-amount caps; raise --epochs or lower "
                      "the proxies' tokens (--proxy-steps)")


def _losses_of(result: Any) -> Mapping[str, float]:
    if isinstance(result, Mapping):
        return result
    vl = getattr(result, "valid_loss", None)
    if not isinstance(vl, Mapping):
        raise TypeError("train_fn must return a mapping domain -> loss or an object with .valid_loss")
    return vl


def run_proxies(mixtures: np.ndarray, train_fn: Callable[[dict[str, float], int], Any], domains: list[str],
                *, cache_path: str | Path | None = None, progress: bool = True, key: dict | None = None,
                docs_sha: str | None = None) -> list[ProxyRun]:
    """Train one proxy per mixture row with the injected ``train_fn(weights: {domain: w}, index)``,
    which returns per-domain validation losses (a mapping, or an object with ``.valid_loss`` such as
    ``megamix.train.loop.TrainResult`` or :class:`ProxyResult`, whose ``.doc_loss`` is kept too).

    With ``cache_path`` (jsonl), finished proxies are appended as they complete and reused whenever a
    later call asks for the same mixture (weights equal to 1e-9) with the same ``key`` (describe the
    budget, model and data there), so long sweeps resume and different commands (``d2v regmix``,
    ``d2v evaluate``) share proxies. ``docs_sha``: the fingerprint of the validation documents the
    proxies must be scored on; only entries with document losses on those documents are reused, and
    ``train_fn`` must return ``doc_loss``.
    """
    R = np.asarray(mixtures, np.float64)
    if R.ndim != 2 or R.shape[1] != len(domains):
        raise ValueError(f"mixtures must be [M, {len(domains)}] (got {R.shape})")
    for i, row in enumerate(R):
        try:
            validate(row, names=domains)
        except ValueError as e:
            raise ValueError(f"each mixture must be non-negative and sum to 1; row {i}: {e}") from None
    key = json.loads(json.dumps(key)) if key is not None else None  # normalise (tuples -> lists)
    done: dict[int, ProxyRun] = {}
    cache = Path(cache_path) if cache_path else None
    if cache and cache.is_file():
        cached = []
        for o in read_jsonl(cache):
            if set(o["weights"]) != set(domains) or o.get("key") != key:
                continue
            if docs_sha is not None and (o.get("doc_loss") is None or o.get("docs_sha") != docs_sha):
                continue
            cached.append((np.asarray([o["weights"][d] for d in domains]), o))
        for i, row in enumerate(R):
            for w, o in cached:
                if np.allclose(w, row, rtol=0, atol=1e-9):
                    done[i] = ProxyRun(i, o["weights"], o["valid_loss"], o.get("doc_loss"), key, o.get("docs_sha"))
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
        result = train_fn(w, i)
        vl = {str(k): float(v) for k, v in _losses_of(result).items()}
        bad = {k: v for k, v in vl.items() if not np.isfinite(v)}
        if bad:
            raise ValueError(f"proxy {i} returned non-finite losses {bad}")
        dl = getattr(result, "doc_loss", None)
        if dl is not None:
            dl = [float(x) for x in dl]
            if not np.all(np.isfinite(dl)):
                raise ValueError(f"proxy {i} returned non-finite document losses")
        elif docs_sha is not None:
            raise ValueError(f"proxy {i}: train_fn returned no document losses (doc_loss)")
        run = ProxyRun(i, w, vl, dl, key, docs_sha if dl is not None else None)
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

    A meta-domain whose target column is all NaN (no validation document was assigned to it) gets no
    model; :meth:`predict` renormalises ``q`` over the fitted meta-domains (``self.fitted``).

    Args:
        V_train: ``[m, n]`` training-domain vectors.
        lgbm_params: overrides for ``lightgbm.LGBMRegressor`` (defaults suit tens to thousands of proxies).
    """

    def __init__(self, V_train: np.ndarray, lgbm_params: dict | None = None, seed: int = 0):
        self.V = np.asarray(V_train, np.float64)
        self.seed = seed
        self.params = dict(lgbm_params or {})
        self.models: list = []
        self.fitted: np.ndarray | None = None

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
            raise ConfigError(f"need at least 4 proxy runs to fit the regressors (got {R.shape[0]}); pass "
                              "--proxies 4 or more")
        finite = np.isfinite(Y)
        fitted = finite.all(axis=0)
        partial = ~fitted & finite.any(axis=0)
        if partial.any():
            raise ValueError(f"meta_losses columns {np.where(partial)[0].tolist()} are NaN for some proxies "
                             "only; a meta-domain's target must be measured for every proxy or for none")
        if not fitted.any():
            raise ValueError("every meta-domain target is NaN")
        X = R @ self.V
        self.models = []
        it = range(Y.shape[1])
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="fit LightGBM per meta-domain", unit="model")
        for j in it:
            if not fitted[j]:
                self.models.append(None)
                continue
            mdl = self._make(len(X))
            mdl.fit(X, Y[:, j])
            self.models.append(mdl)
        self.fitted = fitted
        return self

    def predict_meta(self, R: np.ndarray) -> np.ndarray:
        """Predicted per-meta-domain losses ``[K, n]`` for mixtures ``R [K, m]`` (NaN where unfitted)."""
        if not self.models:
            raise RuntimeError("call fit() first")
        X = np.atleast_2d(np.asarray(R, np.float64)) @ self.V
        return np.stack([m.predict(X) if m is not None else np.full(len(X), np.nan) for m in self.models],
                        axis=1)

    def predict(self, R: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``L_valid(r) = Σ_j q_j f_j(r @ V)`` for each row of ``R``, with ``q`` renormalised over the
        fitted meta-domains; only meta-domains with q_j > 0 run."""
        if not self.models:
            raise RuntimeError("call fit() first")
        q = np.asarray(q, np.float64)
        if q.shape != (self.V.shape[1],):
            raise ValueError(f"q must have {self.V.shape[1]} entries (got {q.shape})")
        q = np.where(self.fitted, q, 0.0)
        if q.sum() <= 1e-12:
            raise ValueError("q puts no mass on a meta-domain with a fitted model")
        q = q / q.sum()
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

"""Proxy training and evaluation of DA² / Domain2Vec+RegMix against real training runs.

:func:`make_trainer_fn` wraps ``megamix.train.loop.train`` as a ``train_fn`` for
:func:`megamix.domain2vec.regmix.run_proxies`: one small static-mixture run per mixture, scored on
the validation documents when they are given (:mod:`megamix.domain2vec.metaloss`).
:func:`evaluate_predictions` trains proxies on a set of mixtures and reports how well each predictor
ranks the actual validation objective (Spearman and Pearson, with a bootstrap 95% interval for
Spearman; the paper reports Spearman 0.67 for DA² with Huber):

- DA² with every distance, Huber at the chosen δ and at δ = 1 (= ½·MSE on probability vectors);
- two naive predictors that know nothing about the data: the L1 distance of the mixture to uniform
  and its negative entropy (both grow as a mixture concentrates on few domains);
- cross-validated Domain2Vec+RegMix with each kind of meta-domain target (``bayes``, the earlier
  approach; ``argmax`` and ``proba``, measured on documents).

Correlations are reported on all mixtures and on the subset without the sparse ones (groups
``sparse`` and ``pair``), because sparse mixtures are where the naive predictors are strongest.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from megamix.configbase import ConfigError
from megamix.data.errors import DataError
from megamix.domain2vec.da2 import DISTANCES, distance_batch
from megamix.domain2vec.metaloss import ValidDocs, meta_losses_from_docs, score_documents, tokenize_docs
from megamix.domain2vec.regmix import D2VRegMix, ProxyResult, domain_to_meta_losses, run_proxies
from megamix.domain2vec.vectorize import DomainVectors
from megamix.io import atomic_write_json

__all__ = ["make_trainer_fn", "proxy_budget", "evaluation_mixtures", "valid_objective", "naive_predictors", "evaluate_predictions",
           "correlations", "save_report", "SPARSE_GROUPS"]

SPARSE_GROUPS = ("sparse", "pair")


def proxy_budget(cfg, steps: int | None = None) -> dict:
    """What a proxy trained from ``cfg`` (with ``steps`` overriding ``train.steps``) costs and is:
    steps, tokens, model and optimisation settings. Recorded in reports and used as the proxy cache key."""
    t = cfg.train
    s = int(steps) if steps is not None else int(t.steps)
    warm = min(t.warmup_steps, max(1, s // 10)) if steps is not None else t.warmup_steps
    return {"steps": s, "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "seq_len": cfg.model.seq_len, "tokens": s * t.global_batch_size * cfg.model.seq_len,
            "lr": t.lr, "min_lr_ratio": t.min_lr_ratio, "warmup_steps": warm, "weight_decay": t.weight_decay,
            "seed": t.seed, "dtype": t.dtype, "eval_batches": t.eval_batches, "loss_impl": t.loss_impl,
            "model": asdict(cfg.model)}


def _mixture_id(weights: dict[str, float]) -> str:
    text = json.dumps({d: round(float(w), 12) for d, w in sorted(weights.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_trainer_fn(base_cfg, out_root: str | Path, *, steps: int | None = None, docs: ValidDocs | None = None,
                    progress: bool = False) -> Callable[[dict[str, float], int], Any]:
    """A ``train_fn(weights, index)`` that trains a proxy with the real trainer.

    Every proxy copies ``base_cfg`` (a :class:`megamix.config.MegamixConfig`) with: the mixture as
    ``mixture.kind=explicit``, ``mixing.strategy=static``, gradient projection off, no resume,
    evaluation only at the end, the plain single-process backend (a proxy is one process) and
    ``train.out_dir=<out_root>/proxy_<id>`` (``id`` hashes the mixture, so runs of different commands
    sharing ``out_root`` never overwrite each other). With ``docs`` the trained model is also scored on the
    validation documents (their first ``model.seq_len + 1`` tokens) and the result is a
    :class:`~megamix.domain2vec.regmix.ProxyResult` with ``doc_loss``.
    """
    from megamix.train.backend import make_backend
    from megamix.train.loop import train

    root = Path(out_root)
    tokens = tokenize_docs(docs.texts, base_cfg.model.seq_len) if docs is not None else None

    def train_fn(weights: dict[str, float], index: int):
        cfg = copy.deepcopy(base_cfg)
        s = sum(weights.values())
        cfg.data.domains = list(weights)
        cfg.mixture.kind = "explicit"
        cfg.mixture.weights = {d: float(w) / float(s) for d, w in weights.items()}
        cfg.mixing.strategy = "static"
        cfg.projection.enabled = False
        cfg.deepspeed.enabled = False
        cfg.train.resume = False
        cfg.train.checkpoint_every = 0
        cfg.train.eval_every = 0
        if steps is not None:
            cfg.train.steps = int(steps)
            cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, int(steps) // 10))
        cfg.train.out_dir = str(root / f"proxy_{_mixture_id(cfg.mixture.weights)}")
        backend = make_backend(cfg)
        res = train(cfg, backend=backend, progress=progress, log_to_stdout=False)
        if tokens is None:
            return res
        return ProxyResult(res.valid_loss, score_documents(backend.model, tokens).tolist())

    return train_fn


def evaluation_mixtures(m: int, *, n_dirichlet: int, alpha: np.ndarray, n_sparse: int = 6, n_pairs: int = 6,
                        seed: int = 0, caps: np.ndarray | None = None, sparse_alpha: float = 0.5,
                        pair_split: float = 0.7, domains: list[str] | None = None
                        ) -> tuple[np.ndarray, list[str], list[str]]:
    """The mixtures to train proxies on, with labels and groups:

    - ``dirichlet``: ``n_dirichlet`` draws from ``Dirichlet(alpha)`` (the search's α);
    - ``sparse``: ``n_sparse`` draws from the symmetric ``Dirichlet(sparse_alpha)`` (0.5: a few domains
      carry most of the weight);
    - ``pair``: ``n_pairs`` two-domain mixtures ``pair_split / (1 − pair_split)`` (70/30) over distinct
      seeded ordered pairs.

    Mixtures that break ``caps`` are rejected. Seeded; each group's draws do not depend on the other
    groups' counts. Pair labels name the domains (``domains``) or their indices."""
    from megamix.domain2vec.regmix import sample_mixtures

    parts, labels, groups = [], [], []
    if n_dirichlet:
        parts.append(sample_mixtures(m, n_dirichlet, alpha, seed=seed, caps=caps))
        labels += [f"dirichlet{i}" for i in range(n_dirichlet)]
        groups += ["dirichlet"] * n_dirichlet
    if n_sparse:
        parts.append(sample_mixtures(m, n_sparse, np.full(m, sparse_alpha), seed=seed + 1, caps=caps))
        labels += [f"sparse{i}" for i in range(n_sparse)]
        groups += ["sparse"] * n_sparse
    if n_pairs:
        if m < 2:
            raise ConfigError("70/30 pairs need at least 2 domains; pass --pairs 0")
        rng = np.random.default_rng(seed + 2)
        cands = [(a, b) for a in range(m) for b in range(m) if a != b]
        rows, names = [], []
        for k in rng.permutation(len(cands)):
            a, b = cands[k]
            r = np.zeros(m)
            r[a], r[b] = pair_split, 1.0 - pair_split
            if caps is not None and np.any(r > caps + 1e-12):
                continue
            rows.append(r)
            na, nb = (domains[a], domains[b]) if domains else (a, b)
            names.append(f"pair:{na}/{nb}")
            if len(rows) == n_pairs:
                break
        if len(rows) < n_pairs:
            raise ConfigError(f"only {len(rows)} of {n_pairs} 70/30 pairs satisfy the data-amount caps; lower "
                              "--pairs or raise --epochs")
        parts.append(np.asarray(rows))
        labels += names
        groups += ["pair"] * n_pairs
    if not parts:
        raise ConfigError("no mixtures requested; set --mixtures, --sparse or --pairs above 0")
    return np.concatenate(parts), labels, groups


def valid_objective(valid_loss: dict[str, float], vectors: DomainVectors) -> float:
    """The validation loss DA² targets: ``Σ_d w_d L_d`` over the validation domains with the weights
    used to build ``v_valid`` (uniform by default)."""
    missing = [d for d in vectors.valid_domains if d not in valid_loss]
    if missing:
        raise ValueError(f"proxy result lacks validation losses for {missing}")
    return float(sum(w * valid_loss[d] for d, w in zip(vectors.valid_domains, vectors.valid_weights)))


def naive_predictors(R: np.ndarray) -> dict[str, np.ndarray]:
    """Data-blind predictors of a mixture's loss (higher = predicted worse): ``l1_to_uniform``
    ``Σ_i |r_i − 1/m|`` and ``neg_entropy`` ``Σ_i r_i log r_i``."""
    R = np.atleast_2d(np.asarray(R, np.float64))
    m = R.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(R > 0, R * np.log(np.where(R > 0, R, 1.0)), 0.0).sum(axis=1)
    return {"l1_to_uniform": np.abs(R - 1.0 / m).sum(axis=1), "neg_entropy": ent}


def correlations(pred: np.ndarray, actual: np.ndarray, n_boot: int = 0, seed: int = 0) -> dict:
    """Spearman and Pearson correlation (with p-values) between predictions and actual values; with
    ``n_boot`` > 0 also a percentile bootstrap 95% interval of Spearman (resampling mixtures)."""
    from scipy.stats import pearsonr, spearmanr

    pred, actual = np.asarray(pred, float), np.asarray(actual, float)
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(actual) == 0:
        return {"spearman": float("nan"), "pearson": float("nan"), "n": int(len(pred))}
    s, sp = spearmanr(pred, actual)
    p, pp = pearsonr(pred, actual)
    out = {"spearman": float(s), "spearman_p": float(sp), "pearson": float(p), "pearson_p": float(pp),
           "n": int(len(pred))}
    if n_boot > 0:
        from scipy.stats import rankdata

        idx = np.random.default_rng(seed).integers(0, len(pred), size=(n_boot, len(pred)))
        a = rankdata(pred[idx], axis=1)  # Spearman = Pearson of the (tie-averaged) ranks
        b = rankdata(actual[idx], axis=1)
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
        den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        ok = den > 0
        if ok.any():
            bs = (a * b).sum(axis=1)[ok] / den[ok]
            out["spearman_ci95"] = [float(np.quantile(bs, 0.025)), float(np.quantile(bs, 0.975))]
    return out


def _cv_predict(V: np.ndarray, R: np.ndarray, Y: np.ndarray, q: np.ndarray, folds: list, seed: int) -> np.ndarray:
    pred = np.zeros(len(R))
    for f in folds:
        tr = np.setdiff1d(np.arange(len(R)), f)
        pred[f] = D2VRegMix(V, seed=seed).fit(R[tr], Y[tr]).predict(R[f], q)
    return pred


def _target_agreement(Y_ref: np.ndarray, Y: np.ndarray) -> dict:
    """Per meta-domain Spearman (across proxies) of measured targets ``Y`` against ``Y_ref``."""
    from scipy.stats import spearmanr

    rho = []
    for j in range(Y.shape[1]):
        a, b = Y_ref[:, j], Y[:, j]
        if np.all(np.isfinite(b)) and np.ptp(a) > 0 and np.ptp(b) > 0:
            rho.append(float(spearmanr(a, b)[0]))
    fin = np.isfinite(Y).all(axis=0)
    return {"spearman_vs_bayes_median": float(np.median(rho)) if rho else float("nan"),
            "spearman_vs_bayes_min": float(np.min(rho)) if rho else float("nan"),
            "mean_abs_diff_vs_bayes": float(np.mean(np.abs(Y[:, fin] - Y_ref[:, fin]))) if fin.any() else float("nan"),
            "meta_domains_with_target": int(fin.sum())}


def evaluate_predictions(vectors: DomainVectors, mixtures: np.ndarray, train_fn, *,
                         labels: list[str] | None = None, groups: list[str] | None = None, delta: float = 1.0,
                         cv_folds: int = 4, cache_path: str | Path | None = None, seed: int = 0,
                         progress: bool = True, docs: ValidDocs | None = None, key: dict | None = None,
                         n_boot: int = 1000) -> dict:
    """Train one proxy per mixture and correlate every predictor with the actual validation objective.

    Returns ``{"da2": {distance: corr}, "naive": {...}, "regmix_cv": {target: corr} | None,
    "correlations": {"all" | "without_sparse": {predictor: corr}}, "meta_targets": {...}, "runs": [...]}``
    (see the module docstring). ``groups`` labels each mixture (``sparse`` and ``pair`` mark the sparse
    ones). ``regmix_cv`` is ``cv_folds``-fold cross-validated Domain2Vec+RegMix (needs >= 8 runs);
    with ``docs`` the proxies are scored per document and the ``argmax`` / ``proba`` targets are added.
    """
    R, labels, groups = _check_mixtures(vectors, mixtures, labels, groups)
    runs = run_proxies(R, train_fn, vectors.domains, cache_path=cache_path, progress=progress, key=key,
                       docs_sha=docs.sha256 if docs is not None else None)
    actual = np.asarray([valid_objective(r.valid_loss, vectors) for r in runs])
    preds = _blind_predictors(R, vectors, delta)
    report: dict = {"n_runs": len(runs), "delta": float(delta), "actual": "valid_objective: sum_d w_d L_d, "
                    "the trainer's per-domain validation losses weighted as in v_valid"}
    folds, Ys = _cv_folds_and_bayes_targets(vectors, runs, len(R), cv_folds, seed)
    doc_obj = None
    if docs is not None:
        doc_obj = _document_targets(report, Ys, runs, docs, vectors, actual, cache_path)
    report["regmix_cv"] = None
    if folds is not None:
        for mode, Y in Ys.items():
            preds[f"regmix_cv_{mode}"] = _cv_predict(vectors.V_train, R, Y, vectors.v_valid, folds, seed)
    _add_correlations(report, preds, actual, groups, list(Ys) if folds is not None else None, n_boot, seed)
    report["runs"] = _run_rows(runs, labels, groups, actual, preds, doc_obj, Ys.get("argmax"))
    return report


def _check_mixtures(vectors: DomainVectors, mixtures: np.ndarray, labels: list[str] | None,
                    groups: list[str] | None) -> tuple[np.ndarray, list[str], list[str]]:
    """The mixtures as a float array with their labels and groups (defaults filled in), checked."""
    if vectors.v_valid is None:
        raise ValueError("the vectors have no validation vector; run `megamix d2v vectorize` with "
                         "validation domains")
    R = np.asarray(mixtures, np.float64)
    labels = labels or [f"mix{i}" for i in range(len(R))]
    groups = groups or ["dirichlet"] * len(R)
    if not (len(labels) == len(groups) == len(R)):
        raise ValueError(f"{len(R)} mixtures but {len(labels)} labels and {len(groups)} groups")
    return R, labels, groups


def _blind_predictors(R: np.ndarray, vectors: DomainVectors, delta: float) -> dict[str, np.ndarray]:
    """The predictors that need no proxy run: DA² under every distance (and Huber with δ = 1), and the
    naive ones."""
    P = R @ vectors.V_train
    v = vectors.v_valid
    preds: dict[str, np.ndarray] = {}
    for kind in DISTANCES:
        preds[f"da2_{kind}"] = distance_batch(P, v, kind, delta)
    preds["da2_huber_delta1"] = distance_batch(P, v, "huber", 1.0)
    preds.update(naive_predictors(R))
    return preds


def _cv_folds_and_bayes_targets(vectors: DomainVectors, runs: list, n: int, cv_folds: int,
                                seed: int) -> tuple[list | None, dict[str, np.ndarray]]:
    """The seeded cross-validation folds over the ``n`` runs and the ``bayes`` meta-domain targets, when
    there are enough runs (>= 8) for RegMix's cross-validation; else ``(None, {})``."""
    Ys: dict[str, np.ndarray] = {}
    folds = None
    if len(runs) >= 8 and cv_folds >= 2 and len(vectors.valid_domains):
        folds = np.array_split(np.random.default_rng(seed).permutation(n), cv_folds)
        L = np.asarray([[r.valid_loss[d] for d in vectors.valid_domains] for r in runs])
        Ys["bayes"] = domain_to_meta_losses(L, vectors.V_valid, vectors.valid_weights)
    return folds, Ys


def _document_targets(report: dict, Ys: dict[str, np.ndarray], runs: list, docs: ValidDocs,
                      vectors: DomainVectors, actual: np.ndarray, cache_path) -> np.ndarray:
    """Add the ``argmax`` / ``proba`` targets (from the proxies' document losses) to ``Ys`` and their
    summary to ``report``; return each run's document objective."""
    D = np.asarray([r.doc_loss for r in runs], np.float64)
    if D.shape[1] != len(docs):
        raise DataError(f"cached proxies were scored on {D.shape[1]} documents, the vectors have {len(docs)}; "
                        f"remove the proxy cache {cache_path} or choose another --proxy-dir")
    doc_obj = D @ docs.weights
    report["doc_objective"] = {"what": "sum_i a_i l_i over the validation documents",
                               "vs_valid_objective": correlations(doc_obj, actual)}
    for mode in ("argmax", "proba"):
        Ys[mode] = meta_losses_from_docs(D, docs.proba, docs.weights, mode)
    q = vectors.v_valid
    report["meta_targets"] = {
        "default": "argmax",
        "uncovered_argmax": [vectors.meta_names[j] if j < len(vectors.meta_names) else str(j)
                             for j in np.where(~np.isfinite(Ys["argmax"][0]))[0]],
        "uncovered_q_mass": float(q[~np.isfinite(Ys["argmax"][0])].sum()),
        "proba_identity_max_abs": float(np.max(np.abs(Ys["proba"] @ q - doc_obj))),
    }
    if "bayes" in Ys:
        for mode in ("argmax", "proba"):
            report["meta_targets"][mode] = _target_agreement(Ys["bayes"], Ys[mode])
    return doc_obj


def _add_correlations(report: dict, preds: dict[str, np.ndarray], actual: np.ndarray, groups: list[str],
                      cv_modes: list[str] | None, n_boot: int, seed: int) -> None:
    """Every predictor's correlation with the actual objective, over all mixtures and without the sparse
    ones, and the per-family summaries (``da2``, ``naive``, ``regmix_cv`` for ``cv_modes``)."""
    sparse = np.isin(np.asarray(groups), SPARSE_GROUPS)
    subsets = {"all": np.ones(len(actual), bool), "without_sparse": ~sparse}
    report["correlations"] = {name: {p: correlations(x[mask], actual[mask], n_boot, seed) for p, x in preds.items()}
                              for name, mask in subsets.items()}
    report["subset_sizes"] = {name: int(mask.sum()) for name, mask in subsets.items()}
    allc = report["correlations"]["all"]
    report["da2"] = {kind: allc[f"da2_{kind}"] for kind in DISTANCES}
    report["da2"]["huber_delta1"] = allc["da2_huber_delta1"]
    report["naive"] = {k: allc[k] for k in ("l1_to_uniform", "neg_entropy")}
    if cv_modes is not None:
        report["regmix_cv"] = {mode: allc[f"regmix_cv_{mode}"] for mode in cv_modes}


def _run_rows(runs: list, labels: list[str], groups: list[str], actual: np.ndarray, preds: dict[str, np.ndarray],
              doc_obj: np.ndarray | None, argmax_targets: np.ndarray | None) -> list[dict]:
    """One report row per proxy run (with its document objective and argmax targets when scored per
    document)."""
    rows = []
    for i, r in enumerate(runs):
        row = {"label": labels[i], "group": groups[i], "weights": r.weights, "valid_objective": float(actual[i]),
               "valid_loss": r.valid_loss, "predictors": {p: float(x[i]) for p, x in preds.items()}}
        if doc_obj is not None:
            row["doc_objective"] = float(doc_obj[i])
            row["meta_loss_argmax"] = [None if not np.isfinite(y) else float(y) for y in argmax_targets[i]]
        rows.append(row)
    return rows


def save_report(report: dict, path: str | Path) -> None:
    """Write the report JSON atomically."""
    atomic_write_json(Path(path), report)

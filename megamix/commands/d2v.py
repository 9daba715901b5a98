"""`megamix d2v`: Domain2Vec offline prior.

Pipeline (each step has --help)::

    megamix d2v vocab     --data-dir data --out data/d2v --k 32 --elbow 4,8,16,32,64
    megamix d2v classify  --vocab data/d2v
    megamix d2v vectorize --vocab data/d2v --data-dir data --n 1000
    megamix d2v da2       --vectors data/d2v/vectors.json -c configs/tiny-cpu.yaml --out data/d2v/mixture_da2.json
    megamix d2v regmix    --vectors data/d2v/vectors.json -c configs/tiny-cpu.yaml --proxies 16 --proxy-steps 30
    megamix d2v evaluate  --vectors data/d2v/vectors.json -c configs/tiny-cpu.yaml --mixtures 12 --proxy-steps 30
    megamix d2v plot      --vectors data/d2v/vectors.json --out-dir data/d2v

Use the resulting mixture with ``--set mixture.kind=file --set mixture.file=data/d2v/mixture_da2.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from megamix.commands.config import add_config_args
from megamix.configbase import ConfigError


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _max_drift(s: str) -> float:
    """``--max-drift``: a number in (0, 1]; anything else is a one-line usage error naming the option."""
    from megamix.simplex import check_max_drift

    try:
        return check_max_drift(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    p = sub.add_parser("d2v", help="Domain2Vec: meta-domain vocabulary, dataset vectors, DA² and "
                                   "Domain2Vec+RegMix mixture priors.",
                       description=__doc__.split("\n\n")[0])
    s = p.add_subparsers(dest="d2v_command", metavar="STEP")
    _add_vocab(s)
    _add_classify(s)
    _add_vectorize(s)
    for name, helptext, fn in (("da2", "Pick the mixture by distribution alignment (DA²).", run_da2),
                               ("regmix", "Domain2Vec+RegMix: proxies scored per meta-domain + LightGBM per "
                                          "meta-domain.", run_regmix),
                               ("evaluate", "Train proxies on dense and sparse mixtures; rank-correlate DA², "
                                            "naive predictors and RegMix with actual validation loss.",
                                run_evaluate)):
        _add_prior_step(s, name, helptext, fn)
    pl = s.add_parser("plot", help="Heatmap and PCA/t-SNE maps of the domain vectors.")
    pl.add_argument("--vectors", default="data/d2v/vectors.json")
    pl.add_argument("--out-dir", default=None, help="Default: the vectors' folder.")
    pl.set_defaults(func=run_plot)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _add_vocab(s) -> None:
    v = s.add_parser("vocab", help="Embed the reference corpus and k-means it into meta-domains.")
    v.add_argument("--data-dir", default="data", help="Corpus root (reads corpus/<domain>/train.jsonl).")
    v.add_argument("--out", default="data/d2v", help="Output folder for vocab.npz/json, reference.npz, elbow.*")
    v.add_argument("--domains", default=None, help="Comma-separated domains (default: all).")
    v.add_argument("--embedder", default="minilm", help="Embedding backend: minilm (default) | hashing | registered.")
    v.add_argument("--max-tokens", type=int, default=256, help="Embedder truncation in tokens.")
    v.add_argument("--k", type=int, default=32, help="Total number of meta-domains.")
    v.add_argument("--docs-per-domain", type=int, default=500, help="Passages sampled per domain.")
    v.add_argument("--max-chars", type=int, default=1024, help="Passage length cap in characters.")
    v.add_argument("--group-by", default="language", choices=["language", "coarse", "none"],
                   help="Cluster per detected language (code:<lang>, en, de, ...), coarse (all code one group), or none.")
    v.add_argument("--elbow", default="", help="k values for the inertia/elbow report, e.g. 4,8,16,32,64.")
    v.add_argument("--batch-size", type=int, default=256, help="Streaming batch (embed + partial_fit).")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=run_vocab)


def _add_classify(s) -> None:
    c = s.add_parser("classify", help="Train the meta-domain classifier (logistic regression on embeddings).")
    c.add_argument("--vocab", default="data/d2v", help="Folder written by `d2v vocab`.")
    c.add_argument("--C", type=float, default=10.0, help="Inverse regularisation strength.")
    c.add_argument("--holdout", type=float, default=0.2, help="Held-out fraction for the accuracy report.")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_classify)


def _add_vectorize(s) -> None:
    z = s.add_parser("vectorize", help="Domain vectors of every training domain and of the validation set.")
    z.add_argument("--vocab", default="data/d2v", help="Folder with the vocabulary and classifier.")
    z.add_argument("--data-dir", default="data")
    z.add_argument("--domains", default=None, help="Training domains (default: all).")
    z.add_argument("--valid-domains", default=None, help="Validation domains (default: all with valid.jsonl).")
    z.add_argument("--n", type=int, default=1000, help="Passages sampled per dataset (paper: 1000).")
    z.add_argument("--max-chars", type=int, default=1024)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--out", default=None, help="vectors.json path (default: <vocab>/vectors.json).")
    z.set_defaults(func=run_vectorize)


def _add_prior_step(s, name: str, helptext: str, fn) -> None:
    """The parser of ``da2``, ``regmix`` or ``evaluate``: the shared search options, then the step's own."""
    a = s.add_parser(name, help=helptext, description=helptext)
    a.add_argument("--vectors", default="data/d2v/vectors.json", help="vectors.json from `d2v vectorize`.")
    add_config_args(a)
    _add_search_args(a)
    if name == "da2":
        a.add_argument("--solver", default="dirichlet", choices=["dirichlet", "exact"],
                       help="dirichlet: the paper's search (default); exact: convex solver. Both are "
                            "always computed and recorded in meta, with the search under the other α.")
    if name in ("da2", "regmix"):
        a.add_argument("--out", default=None, help="Mixture JSON (default: next to the vectors).")
        a.add_argument("--max-drift", type=_max_drift, default=None,
                       help="Optional meta.max_drift for online strategies (per-domain |Δw| bound).")
    if name in ("regmix", "evaluate"):
        a.add_argument("--proxy-steps", type=int, default=None,
                       help="Override train.steps for proxies (sets their budget and their data-amount caps).")
        a.add_argument("--proxy-dir", default=None,
                       help="Proxy run folder (default: <vectors dir>/proxies). Finished proxies are cached in "
                            "<proxy-dir>/proxies.jsonl, keyed by mixture and budget, and shared by regmix "
                            "and evaluate.")
    if name == "regmix":
        a.add_argument("--proxies", type=int, default=16, help="Number of proxy runs.")
        a.add_argument("--meta-targets", default="argmax", choices=["argmax", "proba", "bayes"],
                       help="Per-meta-domain regression targets. argmax (default): each proxy's mean loss "
                            "on the validation documents the classifier assigns to the meta-domain (the "
                            "paper's loss on meta-domain i). proba: documents weighted by the classifier's "
                            "probabilities (then Σ_j q_j L_j is exactly the documents' validation loss). "
                            "bayes: the earlier approach, per-domain losses spread by Bayes' rule, which is "
                            "RegMix on domain losses (kept for comparison).")
    if name == "evaluate":
        _add_evaluate_args(a)
    a.set_defaults(func=fn)


def _add_search_args(a) -> None:
    """Distance, Huber δ, data-amount caps and the Dirichlet candidate search (da2 / regmix / evaluate)."""
    a.add_argument("--distance", default="huber", choices=["huber", "l2", "l1", "kl", "js"])
    a.add_argument("--delta", default="auto",
                   help="Huber δ. 'auto' (default): the median of the component differences "
                        "|(r·V_train - v_valid)_j| over 10k candidate mixtures from the search's Dirichlet, so "
                        "half of the components fall in Huber's quadratic part and half in its linear part; "
                        "the value and the quantiles of the differences are recorded. A number fixes δ. "
                        "Domain vectors are probability vectors, so every difference is <= 1: δ >= 1 (the "
                        "torch/sklearn default) makes Huber exactly ½·MSE, i.e. plain L2.")
    a.add_argument("--total-tokens", type=float, default=None,
                   help="Tokens of the target run for the data-amount constraint (default: from --config "
                        "train.steps*global_batch_size*seq_len when --config is given; 0 = no constraint). "
                        "Proxy mixtures are constrained by the proxies' own tokens (--proxy-steps).")
    a.add_argument("--epochs", type=float, default=1.0, help="Allowed epochs per domain.")
    a.add_argument("--dirichlet", default="scaled", choices=["scaled", "paper"],
                   help="Dirichlet α of the candidate search and of sampled proxy mixtures. scaled "
                        "(default): α = concentration·m·a_train (a_train = token shares; equal shares give "
                        "the uniform distribution on the simplex). paper: the paper's literal "
                        "Dirichlet(a_train), α summing to 1, so nearly every candidate sits near one domain; "
                        "with few domains its top-k average lands farther from the DA² optimum (measured in "
                        "benchmarks/results/d2v/results.md), hence not the default.")
    a.add_argument("--concentration", type=float, default=1.0,
                   help="For --dirichlet scaled: α = concentration·m·token_share.")
    a.add_argument("--samples", type=int, default=100_000, help="Dirichlet candidates.")
    a.add_argument("--top-k", type=int, default=100, help="Average the k best candidates.")
    a.add_argument("--seed", type=int, default=0)


def _add_evaluate_args(a) -> None:
    a.add_argument("--mixtures", type=int, default=12,
                   help="Mixtures drawn from the search's Dirichlet (group 'dirichlet').")
    a.add_argument("--sparse", type=int, default=6,
                   help="Mixtures drawn from the symmetric Dirichlet(0.5) (group 'sparse').")
    a.add_argument("--pairs", type=int, default=6,
                   help="Two-domain 70/30 mixtures over seeded distinct pairs (group 'pair'). Also "
                        "trained: uniform, natural, the exact DA² optimum and the Dirichlet-search pick.")
    a.add_argument("--seed-repeats", type=int, default=0,
                   help="Retrain the uniform mixture with this many other train.seed values to "
                        "measure seed noise.")
    a.add_argument("--bootstrap", type=int, default=1000,
                   help="Bootstrap resamples for the Spearman 95%% intervals (0 = none).")
    a.add_argument("--report", default=None, help="Report JSON (default: <vectors dir>/evaluate.json).")


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_vocab(args) -> int:
    _offline_env()
    from megamix.domain2vec.vocab import build_vocab, embedder_from_spec

    spec = {"name": args.embedder, "max_tokens": args.max_tokens, "kwargs": {}}
    t0 = time.time()
    vocab = build_vocab(args.data_dir, args.out, k=args.k, embedder=embedder_from_spec(spec),
                        embedder_spec=spec, domains=_strs(args.domains),
                        docs_per_domain=args.docs_per_domain, max_chars=args.max_chars,
                        group_by=args.group_by, elbow_ks=_ints(args.elbow) or None,
                        batch_size=args.batch_size, seed=args.seed, progress=True)
    print(f"meta-domains: {vocab.n} over groups {vocab.meta['k_by_group']} from "
          f"{vocab.meta['n_passages']} passages in {time.time() - t0:.1f}s -> {args.out}")
    if "elbow" in vocab.meta:
        print(f"elbow suggestions (kneedle): {vocab.meta['elbow']}  (see {args.out}/elbow.png)")
    return 0


def run_classify(args) -> int:
    _offline_env()
    from megamix.domain2vec.classifier import train_classifier

    clf = train_classifier(args.vocab, C=args.C, holdout=args.holdout, seed=args.seed)
    print(json.dumps(clf.report, indent=2))
    return 0


def run_vectorize(args) -> int:
    _offline_env()
    from megamix.domain2vec.classifier import load_classifier
    from megamix.data.corpus import corpus_domains
    from megamix.domain2vec.corpus import domain_token_counts
    from megamix.domain2vec.vocab import MetaDomainVocab
    from megamix.domain2vec.vectorize import vectorize_corpus

    vocab = MetaDomainVocab.load(args.vocab)
    clf = load_classifier(args.vocab)
    domains = _strs(args.domains) or corpus_domains(args.data_dir, "train", required=True)
    out = args.out or str(Path(args.vocab) / "vectors.json")
    obj = vectorize_corpus(clf, args.data_dir, out, domains=domains, valid_domains=_strs(args.valid_domains),
                           n_samples=args.n, seed=args.seed, max_chars=args.max_chars,
                           meta_names=vocab.names(), train_tokens=domain_token_counts(args.data_dir, domains))
    V = np.asarray(obj["V_train"])
    print(f"V_train {V.shape} for {len(domains)} domains -> {out}")
    for d, row in zip(domains, V):
        top = np.argsort(-row)[:3]
        print(f"  {d:24s} " + ", ".join(f"{vocab.names()[j]}:{row[j]:.2f}" for j in top))
    return 0


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _common(args, *, proxies: bool = False, target: bool = True):
    """Vectors, config, caps, α, δ and the meta dict shared by da2 / regmix / evaluate.

    ``caps`` constrain the *target* run (--total-tokens, else the config's train.steps; skipped when
    not ``target``); with ``proxies`` the proxies' own budget (--proxy-steps) gives their caps
    (``meta['_proxy_caps']``, recorded under ``meta['proxy']``)."""
    from megamix.domain2vec.da2 import data_caps, huber_delta_auto, search_alpha
    from megamix.domain2vec.vectorize import load_vectors

    vec = load_vectors(args.vectors)
    if vec.v_valid is None:
        raise ConfigError(f"{args.vectors} has no validation vector; rerun `megamix d2v vectorize` with "
                          "--valid-domains")
    cfg = None
    if args.config or args.overrides:
        from megamix.commands.config import load_config
        cfg = load_config(args)
    total = args.total_tokens
    if total is None and cfg is not None:
        total = float(cfg.train.steps * cfg.train.global_batch_size * cfg.model.seq_len)
    if not target:
        total = None
    tokens = vec.tokens_array()
    caps = data_caps(tokens, total if total else None, args.epochs)
    alpha = search_alpha(tokens, len(vec.domains), args.dirichlet, args.concentration)
    if str(args.delta).strip().lower() == "auto":
        delta, delta_info = huber_delta_auto(vec.V_train, vec.v_valid, alpha, seed=args.seed)
    else:
        try:
            delta = float(args.delta)
        except ValueError:
            raise ConfigError(f"--delta must be 'auto' or a positive number (got {args.delta!r})") from None
        if not delta > 0:
            raise ConfigError(f"--delta must be > 0 (got {delta}); pass a positive number or 'auto'")
        _, delta_info = huber_delta_auto(vec.V_train, vec.v_valid, alpha, seed=args.seed)
        delta_info = {**delta_info, "rule": "fixed by --delta", "linear_fraction": None}
    vpath = Path(args.vectors)
    if vpath.is_dir():
        vpath = vpath / "vectors.json"
    meta = {"distance": args.distance, "delta": delta, "delta_arg": str(args.delta), "delta_info": delta_info,
            "total_tokens": total, "epochs": args.epochs,
            "caps": dict(zip(vec.domains, caps.tolist())) if caps is not None else None,
            "dirichlet": args.dirichlet, "concentration": args.concentration, "dirichlet_alpha": alpha.tolist(),
            "samples": args.samples, "top_k": args.top_k, "seed": args.seed,
            "vectors": str(vpath), "vectors_sha256": _file_sha256(vpath)}
    if proxies:
        if cfg is None:
            raise ConfigError("proxy runs need a training config: pass --config (e.g. configs/tiny-cpu.yaml)")
        from megamix.domain2vec.evaluate import proxy_budget
        budget = proxy_budget(cfg, args.proxy_steps)
        pcaps = data_caps(tokens, float(budget["tokens"]), args.epochs)
        meta["proxy"] = {**budget, "config": args.config, "overrides": list(args.overrides),
                         "proxy_steps_arg": args.proxy_steps,
                         "caps": dict(zip(vec.domains, pcaps.tolist())) if pcaps is not None else None}
        meta["_proxy_caps"] = pcaps
    return vec, cfg, caps, alpha, meta


def _public(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def run_da2(args) -> int:
    from megamix.domain2vec.da2 import (da2_objective, dirichlet_search, distance, search_alpha, solve_exact)
    from megamix.mixture import write_mixture

    vec, _cfg, caps, alpha, meta = _common(args)
    obj = da2_objective(vec.V_train, vec.v_valid, args.distance, meta["delta"])
    exact = solve_exact(vec.V_train, vec.v_valid, args.distance, caps=caps, delta=meta["delta"])
    search = dirichlet_search(obj, alpha, n_samples=args.samples, top_k=args.top_k, caps=caps, seed=args.seed,
                              progress=True)
    other_kind = "paper" if args.dirichlet == "scaled" else "scaled"
    other = dirichlet_search(obj, search_alpha(vec.tokens_array(), len(vec.domains), other_kind),
                             n_samples=args.samples, top_k=args.top_k, caps=caps, seed=args.seed)
    pick = search if args.solver == "dirichlet" else exact
    meta.update({"solver": args.solver, "objective": pick.value,
                 "exact": {"weights": dict(zip(vec.domains, exact.weights.tolist())), "value": exact.value,
                           "method": exact.method},
                 "dirichlet_search": {"weights": dict(zip(vec.domains, search.weights.tolist())),
                                      "value": search.value, **search.info},
                 f"dirichlet_search_{other_kind}_alpha": {
                     "weights": dict(zip(vec.domains, other.weights.tolist())), "value": other.value,
                     "max_abs_weight_diff_vs_exact": float(abs(other.weights - exact.weights).max()),
                     **other.info},
                 "max_abs_weight_diff_vs_exact": float(abs(search.weights - exact.weights).max())})
    tok = vec.tokens_array()
    if tok is not None:
        nat = tok / tok.sum()
        meta["natural_objective"] = distance(nat @ vec.V_train, vec.v_valid, args.distance, meta["delta"])
    out = args.out or str(Path(args.vectors).with_name("mixture_da2.json"))
    doc = write_mixture(out, vec.domains, pick.weights, "da2", _public(meta), args.max_drift)
    _print_mixture(doc, pick.value, out)
    print(f"Huber δ = {meta['delta']:.4g} ({meta['delta_info']['rule']}); exact optimum {exact.value:.6g}; "
          f"search ({args.dirichlet} α) {search.value:.6g}; search ({other_kind} α) {other.value:.6g}")
    return 0


def _print_mixture(obj: dict, value: float, out: str) -> None:
    print(f"{obj['method']} mixture (objective {value:.6g}) -> {out}")
    for d, w in sorted(obj["weights"].items(), key=lambda kv: -kv[1]):
        print(f"  {d:24s} {w:.4f}")


def _proxy_setup(args, vec, cfg, meta, *, need_docs: bool):
    """(train_fn, proxy root, cache path, cache key, docs) for the proxy runs."""
    import hashlib

    from megamix.domain2vec.evaluate import make_trainer_fn
    from megamix.domain2vec.metaloss import load_valid_docs

    root = args.proxy_dir or str(Path(args.vectors).parent / "proxies")
    docs = load_valid_docs(vec, cfg.data.data_dir) if need_docs else None
    corpus = json.dumps(vec.raw.get("corpus", {}).get("sha256", {}), sort_keys=True)
    key = {k: v for k, v in meta["proxy"].items() if k not in ("config", "overrides", "proxy_steps_arg", "caps")}
    key["corpus_sha256"] = hashlib.sha256(corpus.encode()).hexdigest()[:16]
    fn = make_trainer_fn(cfg, root, steps=args.proxy_steps, docs=docs)
    return fn, root, Path(root) / "proxies.jsonl", key, docs


def run_regmix(args) -> int:
    from megamix.domain2vec.metaloss import meta_losses_from_docs
    from megamix.mixture import write_mixture
    from megamix.domain2vec.regmix import D2VRegMix, domain_to_meta_losses, run_proxies, sample_mixtures

    _offline_env()
    vec, cfg, caps, alpha, meta = _common(args, proxies=True)
    mode = args.meta_targets
    train_fn, root, cache, key, docs = _proxy_setup(args, vec, cfg, meta, need_docs=mode != "bayes")
    R = sample_mixtures(len(vec.domains), args.proxies, alpha, seed=args.seed, caps=meta["_proxy_caps"])
    runs = run_proxies(R, train_fn, vec.domains, cache_path=cache, key=key,
                       docs_sha=docs.sha256 if docs is not None else None)
    if mode == "bayes":
        L = np.asarray([[r.valid_loss[d] for d in vec.valid_domains] for r in runs])
        Y = domain_to_meta_losses(L, vec.V_valid, vec.valid_weights)
        mapping = "bayes: L_j = sum_d p(d|j) L_d, p(d|j) ∝ w_d V_valid[d,j] (RegMix on domain losses)"
    else:
        Y = meta_losses_from_docs(np.asarray([r.doc_loss for r in runs]), docs.proba, docs.weights, mode)
        mapping = (f"{mode}: L_j = sum_i a_i W_ij l_i / sum_i a_i W_ij over {len(docs)} validation documents, "
                   f"W = {'1[j = argmax P_i]' if mode == 'argmax' else 'P_ij'}, a_i = w_d / N_d")
    model = D2VRegMix(vec.V_train, seed=args.seed).fit(R, Y, progress=True)
    res = model.search(vec.v_valid, alpha, n_samples=args.samples, top_k=args.top_k, caps=caps,
                       seed=args.seed, progress=True)
    unfitted = [vec.meta_names[j] if j < len(vec.meta_names) else str(j) for j in np.where(~model.fitted)[0]]
    meta.update({"proxies": len(runs), "proxy_dir": root, "predicted_valid_loss": res.value,
                 "meta_targets": mode, "meta_loss_mapping": mapping, "meta_domains_without_target": unfitted,
                 "q_mass_without_target": float(vec.v_valid[~model.fitted].sum()), **res.info})
    out = args.out or str(Path(args.vectors).with_name("mixture_regmix.json"))
    doc = write_mixture(out, vec.domains, res.weights, "d2v_regmix", _public(meta), args.max_drift)
    _print_mixture(doc, res.value, out)
    if unfitted:
        print(f"  ({len(unfitted)} meta-domains have no validation document by argmax; q renormalised over the rest)")
    return 0


def run_evaluate(args) -> int:
    from megamix.domain2vec.da2 import da2_objective, dirichlet_search, solve_exact
    from megamix.domain2vec.evaluate import (evaluate_predictions, evaluation_mixtures, make_trainer_fn,
                                             save_report, valid_objective)
    from megamix.domain2vec.regmix import run_proxies

    _offline_env()
    vec, cfg, _caps, alpha, meta = _common(args, proxies=True, target=False)
    pcaps = meta["_proxy_caps"]
    train_fn, root, cache, key, docs = _proxy_setup(args, vec, cfg, meta, need_docs=True)
    m = len(vec.domains)
    R, labels, groups = evaluation_mixtures(m, n_dirichlet=args.mixtures, alpha=alpha, n_sparse=args.sparse,
                                            n_pairs=args.pairs, seed=args.seed, caps=pcaps, domains=vec.domains)
    delta = meta["delta"]
    extra = {"uniform": np.full(m, 1.0 / m),
             "da2_exact": solve_exact(vec.V_train, vec.v_valid, args.distance, caps=pcaps, delta=delta).weights,
             "da2_search": dirichlet_search(da2_objective(vec.V_train, vec.v_valid, args.distance, delta), alpha,
                                            n_samples=args.samples, top_k=args.top_k, caps=pcaps,
                                            seed=args.seed).weights}
    tok = vec.tokens_array()
    if tok is not None:
        extra["natural"] = tok / tok.sum()
    R = np.concatenate([R, np.stack(list(extra.values()))])
    labels += list(extra)
    groups += ["reference" if k in ("uniform", "natural") else "da2_pick" for k in extra]
    t0 = time.time()
    rep = evaluate_predictions(vec, R, train_fn, labels=labels, groups=groups, delta=delta, cache_path=cache,
                               seed=args.seed, docs=docs, key=key, n_boot=args.bootstrap)
    if args.seed_repeats > 0:
        import copy

        objs = [next(r["valid_objective"] for r in rep["runs"] if r["label"] == "uniform")]
        seeds = [cfg.train.seed]
        for k in range(1, args.seed_repeats + 1):
            c = copy.deepcopy(cfg)
            c.train.seed = cfg.train.seed + k
            fn = make_trainer_fn(c, Path(root) / f"seed{c.train.seed}", steps=args.proxy_steps)
            run = run_proxies(np.full((1, m), 1.0 / m), fn, vec.domains, cache_path=cache,
                              key={**key, "seed": c.train.seed}, progress=False)[0]
            objs.append(valid_objective(run.valid_loss, vec))
            seeds.append(c.train.seed)
        rep["seed_noise"] = {"mixture": "uniform", "train_seeds": seeds, "valid_objective": objs,
                             "std": float(np.std(objs, ddof=1)),
                             "spread_of_evaluated_mixtures": float(np.ptp([r["valid_objective"] for r in rep["runs"]]))}
    rep["config"] = _public(meta)
    rep["proxy_dir"] = root
    rep["wall_seconds"] = time.time() - t0
    out = args.report or str(Path(args.vectors).with_name("evaluate.json"))
    save_report(rep, out)
    print(f"{rep['n_runs']} proxy runs ({meta['proxy']['steps']} steps, {meta['proxy']['tokens']} tokens each) "
          f"in {rep['wall_seconds']:.0f}s -> {out}")
    print(f"Huber δ = {delta:.4g}; Spearman with actual validation loss (all {rep['subset_sizes']['all']} | "
          f"without sparse {rep['subset_sizes']['without_sparse']}):")
    for p in rep["correlations"]["all"]:
        a, b = rep["correlations"]["all"][p], rep["correlations"]["without_sparse"][p]
        print(f"  {p:22s} {a['spearman']:+.3f} | {b['spearman']:+.3f}")
    return 0


def run_plot(args) -> int:
    from megamix.domain2vec.plots import plot_vectors
    from megamix.domain2vec.vectorize import load_vectors

    vec = load_vectors(args.vectors)
    for p in plot_vectors(vec, args.out_dir or Path(args.vectors).parent):
        print(p)
    return 0

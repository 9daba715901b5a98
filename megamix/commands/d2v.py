"""`megamix d2v`: Domain2Vec offline prior.

Pipeline (each step has --help)::

    megamix d2v vocab     --data-dir data --out data/d2v --k 32 --elbow 4,8,16,32,64
    megamix d2v classify  --vocab data/d2v
    megamix d2v vectorize --vocab data/d2v --data-dir data --n 1000
    megamix d2v da2       --vectors data/d2v/vectors.json -c configs/tiny-cpu.yaml --out data/d2v/mixture_da2.json
    megamix d2v regmix    --vectors data/d2v/vectors.json -c configs/tiny-cpu.yaml --proxies 16
    megamix d2v evaluate  --vectors data/d2v/vectors.json -c configs/tiny-cpu.yaml --mixtures 12
    megamix d2v plot      --vectors data/d2v/vectors.json --out-dir data/d2v

Use the resulting mixture with ``--set mixture.kind=file --set mixture.file=data/d2v/mixture_da2.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from megamix.commands.config import add_config_args


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def register(sub) -> None:
    p = sub.add_parser("d2v", help="Domain2Vec: meta-domain vocabulary, dataset vectors, DA² and "
                                   "Domain2Vec+RegMix mixture priors.",
                       description=__doc__.split("\n\n")[0])
    s = p.add_subparsers(dest="d2v_command", metavar="STEP")

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

    c = s.add_parser("classify", help="Train the meta-domain classifier (logistic regression on embeddings).")
    c.add_argument("--vocab", default="data/d2v", help="Folder written by `d2v vocab`.")
    c.add_argument("--C", type=float, default=10.0, help="Inverse regularisation strength.")
    c.add_argument("--holdout", type=float, default=0.2, help="Held-out fraction for the accuracy report.")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_classify)

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

    for name, helptext, fn in (("da2", "Pick the mixture by distribution alignment (DA²).", run_da2),
                               ("regmix", "Domain2Vec+RegMix: proxies + LightGBM per meta-domain.", run_regmix),
                               ("evaluate", "Train proxies on M mixtures; correlate DA²/RegMix predictions "
                                            "with actual validation loss.", run_evaluate)):
        a = s.add_parser(name, help=helptext, description=helptext)
        a.add_argument("--vectors", default="data/d2v/vectors.json", help="vectors.json from `d2v vectorize`.")
        add_config_args(a)
        a.add_argument("--distance", default="huber", choices=["huber", "l2", "l1", "kl", "js"])
        a.add_argument("--delta", type=float, default=1.0, help="Huber delta.")
        a.add_argument("--total-tokens", type=float, default=None,
                       help="Tokens of the target run for the data-amount constraint (default: from --config "
                            "train.steps*global_batch_size*seq_len when --config is given; 0 = no constraint).")
        a.add_argument("--epochs", type=float, default=1.0, help="Allowed epochs per domain.")
        a.add_argument("--concentration", type=float, default=1.0,
                       help="Dirichlet α = concentration·m·token_share (1/m = the paper's Dirichlet(a_train)).")
        a.add_argument("--samples", type=int, default=100_000, help="Dirichlet candidates.")
        a.add_argument("--top-k", type=int, default=100, help="Average the k best candidates.")
        a.add_argument("--seed", type=int, default=0)
        if name == "da2":
            a.add_argument("--solver", default="dirichlet", choices=["dirichlet", "exact"],
                           help="dirichlet: the paper's search (default); exact: convex solver. Both are "
                                "always computed and recorded in meta.")
        if name in ("da2", "regmix"):
            a.add_argument("--out", default=None, help="Mixture JSON (default: next to the vectors).")
            a.add_argument("--max-drift", type=float, default=None,
                           help="Optional meta.max_drift for online strategies (per-domain |Δw| bound).")
        if name in ("regmix", "evaluate"):
            a.add_argument("--proxy-steps", type=int, default=None, help="Override train.steps for proxies.")
            a.add_argument("--proxy-dir", default=None, help="Proxy run folder (default: <vectors dir>/proxies).")
        if name == "regmix":
            a.add_argument("--proxies", type=int, default=16, help="Number of proxy runs.")
        if name == "evaluate":
            a.add_argument("--mixtures", type=int, default=12, help="Number of random mixtures M (plus natural, "
                                                                     "uniform and the DA² pick).")
            a.add_argument("--report", default=None, help="Report JSON (default: <vectors dir>/evaluate.json).")
        a.set_defaults(func=fn)

    pl = s.add_parser("plot", help="Heatmap and PCA/t-SNE maps of the domain vectors.")
    pl.add_argument("--vectors", default="data/d2v/vectors.json")
    pl.add_argument("--out-dir", default=None, help="Default: the vectors' folder.")
    pl.set_defaults(func=run_plot)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _clean_errors(fn):
    """Report bad input (ValueError, FileNotFoundError) as one line and exit status 2."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(args):
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"megamix d2v {args.d2v_command}: error: {e}", file=sys.stderr)
            return 2
    return wrapper


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@_clean_errors
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


@_clean_errors
def run_classify(args) -> int:
    _offline_env()
    from megamix.domain2vec.classifier import train_classifier

    clf = train_classifier(args.vocab, C=args.C, holdout=args.holdout, seed=args.seed)
    print(json.dumps(clf.report, indent=2))
    return 0


@_clean_errors
def run_vectorize(args) -> int:
    _offline_env()
    from megamix.domain2vec.classifier import load_classifier
    from megamix.domain2vec.corpus import corpus_domains, domain_token_counts
    from megamix.domain2vec.vocab import MetaDomainVocab
    from megamix.domain2vec.vectorize import vectorize_corpus

    vocab = MetaDomainVocab.load(args.vocab)
    clf = load_classifier(args.vocab)
    domains = _strs(args.domains) or corpus_domains(args.data_dir, "train")
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


def _common(args):
    from megamix.domain2vec.da2 import data_caps, dirichlet_alpha
    from megamix.domain2vec.vectorize import load_vectors

    vec = load_vectors(args.vectors)
    if vec.v_valid is None:
        raise SystemExit(f"{args.vectors} has no validation vector; rerun `d2v vectorize` with --valid-domains")
    cfg = None
    if args.config or args.overrides:
        from megamix.commands.config import load_config
        cfg = load_config(args)
    total = args.total_tokens
    if total is None and cfg is not None:
        total = float(cfg.train.steps * cfg.train.global_batch_size * cfg.model.seq_len)
    tokens = vec.tokens_array()
    caps = data_caps(tokens, total if total else None, args.epochs)
    alpha = dirichlet_alpha(tokens, len(vec.domains), args.concentration)
    meta = {"distance": args.distance, "delta": args.delta, "total_tokens": total, "epochs": args.epochs,
            "caps": dict(zip(vec.domains, caps.tolist())) if caps is not None else None,
            "dirichlet_alpha": alpha.tolist(), "samples": args.samples, "top_k": args.top_k,
            "seed": args.seed, "vectors": str(args.vectors)}
    return vec, cfg, caps, alpha, meta


@_clean_errors
def run_da2(args) -> int:
    from megamix.domain2vec.da2 import da2_objective, dirichlet_search, distance, solve_exact
    from megamix.domain2vec.mixture_io import write_mixture

    vec, _cfg, caps, alpha, meta = _common(args)
    exact = solve_exact(vec.V_train, vec.v_valid, args.distance, caps=caps, delta=args.delta)
    search = dirichlet_search(da2_objective(vec.V_train, vec.v_valid, args.distance, args.delta), alpha,
                              n_samples=args.samples, top_k=args.top_k, caps=caps, seed=args.seed, progress=True)
    pick = search if args.solver == "dirichlet" else exact
    meta.update({"solver": args.solver, "objective": pick.value,
                 "exact": {"weights": dict(zip(vec.domains, exact.weights.tolist())), "value": exact.value,
                           "method": exact.method},
                 "dirichlet": {"weights": dict(zip(vec.domains, search.weights.tolist())),
                               "value": search.value, **search.info}})
    tok = vec.tokens_array()
    if tok is not None:
        nat = tok / tok.sum()
        meta["natural_objective"] = distance(nat @ vec.V_train, vec.v_valid, args.distance, args.delta)
    out = args.out or str(Path(args.vectors).with_name("mixture_da2.json"))
    obj = write_mixture(out, vec.domains, pick.weights, "da2", meta, args.max_drift)
    _print_mixture(obj, pick.value, out)
    return 0


def _print_mixture(obj: dict, value: float, out: str) -> None:
    print(f"{obj['method']} mixture (objective {value:.6g}) -> {out}")
    for d, w in sorted(obj["weights"].items(), key=lambda kv: -kv[1]):
        print(f"  {d:24s} {w:.4f}")


def _proxy_fn(args, cfg):
    from megamix.domain2vec.evaluate import make_trainer_fn

    if cfg is None:
        raise SystemExit("proxy runs need a training config: pass --config (e.g. configs/tiny-cpu.yaml)")
    root = args.proxy_dir or str(Path(args.vectors).parent / "proxies")
    return make_trainer_fn(cfg, root, steps=args.proxy_steps), root


@_clean_errors
def run_regmix(args) -> int:
    from megamix.domain2vec.mixture_io import write_mixture
    from megamix.domain2vec.regmix import D2VRegMix, domain_to_meta_losses, run_proxies, sample_mixtures

    _offline_env()
    vec, cfg, caps, alpha, meta = _common(args)
    train_fn, root = _proxy_fn(args, cfg)
    R = sample_mixtures(len(vec.domains), args.proxies, alpha, seed=args.seed, caps=caps)
    runs = run_proxies(R, train_fn, vec.domains, cache_path=Path(root) / "proxies.jsonl")
    L = np.asarray([[r.valid_loss[d] for d in vec.valid_domains] for r in runs])
    Y = domain_to_meta_losses(L, vec.V_valid, vec.valid_weights)
    model = D2VRegMix(vec.V_train, seed=args.seed).fit(R, Y, progress=True)
    res = model.search(vec.v_valid, alpha, n_samples=args.samples, top_k=args.top_k, caps=caps,
                       seed=args.seed, progress=True)
    meta.update({"proxies": len(runs), "proxy_dir": root, "predicted_valid_loss": res.value,
                 "meta_loss_mapping": "bayes: L_j = sum_d p(d|j) L_d, p(d|j) ∝ w_d V_valid[d,j]", **res.info})
    out = args.out or str(Path(args.vectors).with_name("mixture_regmix.json"))
    obj = write_mixture(out, vec.domains, res.weights, "d2v_regmix", meta, args.max_drift)
    _print_mixture(obj, res.value, out)
    return 0


@_clean_errors
def run_evaluate(args) -> int:
    from megamix.domain2vec.da2 import solve_exact
    from megamix.domain2vec.evaluate import evaluate_predictions, save_report
    from megamix.domain2vec.regmix import sample_mixtures

    _offline_env()
    vec, cfg, caps, alpha, meta = _common(args)
    train_fn, root = _proxy_fn(args, cfg)
    m = len(vec.domains)
    R = [sample_mixtures(m, args.mixtures, alpha, seed=args.seed, caps=caps)]
    labels = [f"dirichlet{i}" for i in range(args.mixtures)]
    extra = {"uniform": np.full(m, 1.0 / m),
             "da2_exact": solve_exact(vec.V_train, vec.v_valid, args.distance, caps=caps, delta=args.delta).weights}
    tok = vec.tokens_array()
    if tok is not None:
        extra["natural"] = tok / tok.sum()
    for k, w in extra.items():
        R.append(w[None])
        labels.append(k)
    t0 = time.time()
    rep = evaluate_predictions(vec, np.concatenate(R), train_fn, labels=labels, delta=args.delta,
                               cache_path=Path(root) / "evaluate.jsonl", seed=args.seed)
    rep["config"] = meta
    rep["wall_seconds"] = time.time() - t0
    out = args.report or str(Path(args.vectors).with_name("evaluate.json"))
    save_report(rep, out)
    print(f"{rep['n_runs']} proxy runs in {rep['wall_seconds']:.0f}s -> {out}")
    for kind, c in rep["da2"].items():
        print(f"  DA²[{kind:5s}] spearman {c['spearman']:+.3f}  pearson {c['pearson']:+.3f}  (n={c['n']})")
    if rep["regmix_cv"]:
        c = rep["regmix_cv"]
        print(f"  RegMix CV   spearman {c['spearman']:+.3f}  pearson {c['pearson']:+.3f}")
    return 0


@_clean_errors
def run_plot(args) -> int:
    from megamix.domain2vec.plots import plot_vectors
    from megamix.domain2vec.vectorize import load_vectors

    vec = load_vectors(args.vectors)
    for p in plot_vectors(vec, args.out_dir or Path(args.vectors).parent):
        print(p)
    return 0

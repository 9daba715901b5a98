"""`megamix data`: build the default multi-domain corpus, tokenize it, import your own data, show stats.

Examples::

    megamix data build --data-dir data --cap-mb 2            # default domains, fetched with apt-get download
    megamix data build --domains code_python,legal --no-tokenize
    megamix data tokenize --data-dir data
    megamix data tokenize --data-dir data_minilm --tokenizer path/to/tokenizer_folder
    megamix data tokenizer --data-dir data --vocab 8192 --out data_8k   # train a BPE, tokenize into a new store
    megamix data import --data-dir data --domain mine --from my.jsonl --text-field text
    megamix data import --data-dir data --domain web --from /data/web_text_document --format megatron
    megamix data stats --data-dir data
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megamix.commands.config import add_config_args, load_config
from megamix.configbase import ConfigError


def _common(p, with_domains: bool = True, with_tokenizer: bool = False) -> None:
    add_config_args(p)
    p.add_argument("--data-dir", default=None, help="Data root (default: data.data_dir from the config, 'data').")
    if with_tokenizer:
        p.add_argument("--tokenizer", default=None,
                       help="Tokenizer: 'gpt2', a local tokenizer folder or a cached Hugging Face name (default: "
                            "data.tokenizer, else the one tokens/ records, else gpt2).")
    if with_domains:
        p.add_argument("--domains", default=None,
                       help="Comma-separated domains (default: data.domains, else every default domain).")


def register(sub) -> None:
    p = sub.add_parser("data", help="Build, tokenize, import and inspect the multi-domain corpus.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    b = dsub.add_parser("build", help="Build the default corpus from Debian packages and local text.")
    _common(b, with_tokenizer=True)
    b.add_argument("--cap-mb", type=float, default=None, help="Per-domain cap in MB of text (default 2).")
    b.add_argument("--valid-fraction", type=float, default=None, help="Held-out fraction (default 0.05).")
    b.add_argument("--seed", type=int, default=None, help="Split/sampling seed (default data.seed).")
    b.add_argument("--no-tokenize", action="store_true", help="Only write corpus/, skip tokens/.")
    b.add_argument("--skip-missing", action="store_true",
                   help="Drop domains whose Debian packages cannot be fetched (loud warning) instead of failing.")
    b.add_argument("--offline", action="store_true", help="Use only packages already in data/cache.")
    b.add_argument("--no-apt-update", action="store_true",
                   help="Never run `apt-get update` when a package cannot be located.")
    b.add_argument("--force", action="store_true", help="Rebuild domains even if cached.")
    b.add_argument("--list", action="store_true", help="List the available domains and exit.")
    b.set_defaults(func=run_build)

    t = dsub.add_parser("tokenize", help="Tokenize corpus/ into tokens/ (data.tokenizer, EOS after each doc).")
    _common(t, with_tokenizer=True)
    t.add_argument("--force", action="store_true", help="Re-tokenize even if the corpus is unchanged.")
    t.set_defaults(func=run_tokenize)

    k = dsub.add_parser("tokenizer", help="Train a byte-level BPE on the corpus' train split and tokenize the "
                                          "corpus with it into a new data dir (resumable).")
    _common(k)
    k.add_argument("--out", required=True, help="The new data dir: tokenizer/, corpus/ (links) and tokens/.")
    k.add_argument("--vocab", type=int, default=None, help="Vocabulary size of the BPE to train (e.g. 8192).")
    k.add_argument("--tokenizer", default=None,
                   help="Use this existing tokenizer folder instead of training one (e.g. another store's "
                        "tokenizer/, to tokenize a regrouped corpus the same way).")
    k.add_argument("--min-frequency", type=int, default=2, help="BPE: a pair must occur this often to merge.")
    k.add_argument("--force", action="store_true", help="Retrain the tokenizer and re-tokenize everything.")
    k.set_defaults(func=run_tokenizer)

    i = dsub.add_parser("import", help="Import your own data as one domain (jsonl, parquet, hf, megatron).")
    _common(i, with_domains=False, with_tokenizer=True)
    i.add_argument("--domain", required=True, help="Name of the new domain.")
    i.add_argument("--from", dest="source", required=True,
                   help="Input: a .jsonl/.parquet file, a save_to_disk folder, or a Megatron path prefix.")
    i.add_argument("--format", choices=["jsonl", "parquet", "hf", "megatron"], default=None,
                   help="Input format (default: guessed from the path).")
    i.add_argument("--text-field", default="text", help="Text column/field (default 'text').")
    i.add_argument("--hf-split", default=None, help="Split of a saved DatasetDict (default 'train').")
    i.add_argument("--vocab-size", type=int, default=None,
                   help="Megatron only: the vocabulary the files were tokenized with (must match the tokenizer's).")
    i.add_argument("--valid-fraction", type=float, default=None, help="Held-out fraction (default 0.05).")
    i.add_argument("--seed", type=int, default=None, help="Split seed (default data.seed).")
    i.add_argument("--cap-mb", type=float, default=None, help="Optional cap on imported text in MB.")
    i.add_argument("--max-docs", type=int, default=None, help="Optional cap on imported documents.")
    i.add_argument("--no-tokenize", action="store_true", help="Only write corpus/ (text formats).")
    i.set_defaults(func=run_import)

    s = dsub.add_parser("stats", help="Print a per-domain table of docs, bytes and tokens.")
    _common(s, with_domains=False)
    s.add_argument("--json", action="store_true", help="Print corpus/stats.json instead of a table.")
    s.set_defaults(func=run_stats)

    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _resolve(args):
    cfg = load_config(args).data
    data_dir = Path(args.data_dir or cfg.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir} is a file; pass the data folder (it holds corpus/ and tokens/)")
    domains = None
    if getattr(args, "domains", None):
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    elif cfg.domains:
        domains = list(cfg.domains)
    return cfg, data_dir, domains


def _tokenizer(args, cfg) -> str:
    return args.tokenizer if getattr(args, "tokenizer", None) is not None else cfg.tokenizer


def _fail(msg: str) -> int:
    # on a terminal, first clear a progress bar the error interrupted
    print(("\r\033[K" if sys.stderr.isatty() else "") + f"megamix data: error: {' '.join(str(msg).split())}",
          file=sys.stderr)
    return 2


def run_build(args) -> int:
    from megamix.data.corpus import EmptyDomainError, build_corpus
    from megamix.data.fetch import AptFetcher, MissingPackageError
    from megamix.data.sources import DEFAULT_DOMAINS, SOURCES

    if args.list:
        for name, src in SOURCES.items():
            pk = ", ".join(src.apt_packages) or "(on this machine)"
            print(f"{name:20s} {'default' if src.default else 'opt-in ':7s}  {pk:32s} {src.description}")
        return 0
    cfg, data_dir, domains = _resolve(args)
    unknown = [d for d in domains or [] if d not in SOURCES]
    if unknown:
        raise ConfigError(f"--domains: unknown domain(s) {unknown}; choose from `megamix data build --list`, or add "
                          "your own data with `megamix data import`")
    cap = args.cap_mb if args.cap_mb is not None else cfg.cap_mb
    vf = args.valid_fraction if args.valid_fraction is not None else cfg.valid_fraction
    seed = args.seed if args.seed is not None else cfg.seed
    fetcher = AptFetcher(data_dir / "cache", allow_update=not args.no_apt_update, offline=args.offline)
    t0 = time.perf_counter()
    try:
        stats = build_corpus(data_dir, domains or list(DEFAULT_DOMAINS), cap_mb=cap, valid_fraction=vf,
                             seed=seed, fetcher=fetcher, skip_missing=args.skip_missing, force=args.force)
        built = [d for d in (domains or DEFAULT_DOMAINS) if d in stats["domains"]]
        print(f"corpus: {len(built)} domains under {data_dir / 'corpus'} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if not args.no_tokenize:
            from megamix.data.tokenize import tokenize_corpus
            tokenize_corpus(data_dir, built, force=args.force, tokenizer=_tokenizer(args, cfg))
            print(f"tokens: {data_dir / 'tokens'} ({time.perf_counter() - t0:.1f} s total)", file=sys.stderr)
    except (MissingPackageError, EmptyDomainError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    return run_stats(args)


def _store_line(man: dict, where: Path, extra: str = "") -> str:
    """The one-line summary of a token store's manifest."""
    total = sum(v["train_tokens"] + v["valid_tokens"] for v in man["domains"].values())
    return (f"tokens: {len(man['domains'])} domains, {total:,} tokens in {where} (tokenizer {man['tokenizer']}, "
            f"vocab {man['vocab_size']}, {man['dtype']}{extra})")


def run_tokenize(args) -> int:
    from megamix.data.tokenize import tokenize_corpus

    cfg, data_dir, domains = _resolve(args)
    try:
        man = tokenize_corpus(data_dir, domains, force=args.force, tokenizer=_tokenizer(args, cfg))
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(_store_line(man, data_dir / "tokens"))
    return 0


def run_tokenizer(args) -> int:
    from megamix.data.errors import DataError
    from megamix.data.tokenizer_train import build_tokenized_store

    _, data_dir, domains = _resolve(args)
    t0 = time.perf_counter()
    try:
        man = build_tokenized_store(data_dir, args.out, vocab_size=args.vocab, tokenizer=args.tokenizer,
                                    domains=domains, min_frequency=args.min_frequency, force=args.force,
                                    progress=sys.stderr.isatty())
    except (DataError, FileNotFoundError) as e:
        return _fail(str(e))
    print(_store_line(man, Path(args.out) / "tokens", f"; {time.perf_counter() - t0:.1f} s"))
    return 0


def run_import(args) -> int:
    from megamix.data.errors import DataError
    from megamix.data.importer import import_megatron_domain, import_text_domain

    cfg, data_dir, _ = _resolve(args)
    vf = args.valid_fraction if args.valid_fraction is not None else cfg.valid_fraction
    seed = args.seed if args.seed is not None else cfg.seed
    _check_import_args(args)
    try:
        if args.format == "megatron" or (args.format is None and args.vocab_size is not None):
            entry = import_megatron_domain(data_dir, args.domain, args.source, vocab_size=args.vocab_size,
                                           valid_fraction=vf, seed=seed, tokenizer=_tokenizer(args, cfg))
        else:
            entry = import_text_domain(data_dir, args.domain, args.source, fmt=args.format,
                                       text_field=args.text_field, hf_split=args.hf_split,
                                       valid_fraction=vf, seed=seed, cap_mb=args.cap_mb,
                                       max_docs=args.max_docs, tokenize=not args.no_tokenize,
                                       tokenizer=_tokenizer(args, cfg), progress=sys.stderr.isatty())
    except (DataError, FileNotFoundError) as e:
        return _fail(str(e))
    except ValueError as e:
        if not type(e).__module__.startswith("pyarrow"):
            raise
        return _fail(f"{args.source}: not a readable Parquet file ({' '.join(str(e).split())}); check the file, or "
                     "pass --format for another format")
    tr, va = entry["train"], entry["valid"]
    print(f"imported domain {args.domain!r}: train {tr['docs']} docs / {tr.get('tokens', '?')} tokens, "
          f"valid {va['docs']} docs / {va.get('tokens', '?')} tokens")
    return 0


def _check_import_args(args) -> None:
    """What `data import` can check before reading: the domain name and the kind of path --from names."""
    from megamix.data.errors import check_domain_name

    check_domain_name(args.domain, where="--domain")
    src = Path(args.source)
    fmt = args.format
    prefix = str(src)[:-4] if str(src).endswith((".bin", ".idx")) else str(src)
    guessed = fmt is None and (args.vocab_size is not None or str(src).endswith((".bin", ".idx"))
                               or (not src.exists() and Path(prefix + ".idx").is_file()))
    if fmt == "megatron" or guessed:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not Path(p).is_file()]
        if missing:
            raise ConfigError(f"--from {src}: Megatron store file(s) {missing} not found; pass the path prefix "
                              "shared by the .bin and .idx files (e.g. /data/web_text_document)")
        return
    if not src.exists():
        raise ConfigError(f"--from {src} does not exist; pass a .jsonl or .parquet file, a save_to_disk folder or a "
                          "Megatron path prefix")
    file_format = fmt == "jsonl" or (fmt is None and src.name.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")))
    if src.is_dir() and file_format:
        raise ConfigError(f"--from {src} is a directory; pass the JSON-lines file itself")
    if src.is_dir() and fmt == "parquet" and not any(src.glob("*.parquet")):
        raise ConfigError(f"--from {src} is a directory without .parquet files; pass a .parquet file or a folder "
                          "of them")
    if src.is_file() and fmt == "hf":
        raise ConfigError(f"--from {src} is a file; --format hf takes the folder written by save_to_disk")
    if src.is_file() and src.stat().st_size == 0:
        raise ConfigError(f"--from {src} is empty (0 bytes); pass a file with documents")


def format_stats_table(stats: dict) -> str:
    """A fixed-width table of ``stats.json``'s per-domain numbers."""
    head = f"{'domain':20s} {'train docs':>10s} {'train MB':>9s} {'train tok':>11s} " \
           f"{'valid docs':>10s} {'valid tok':>10s}  source"
    lines = [head, "-" * len(head)]
    tot = [0, 0, 0, 0, 0]
    for name, e in sorted(stats.get("domains", {}).items()):
        tr, va = e.get("train", {}), e.get("valid", {})
        prov = e.get("provenance", {})
        pk = ",".join(f"{p['package']}={p.get('version')}" for p in prov.get("packages", []) if
                      "interpreter" not in p["package"]) or (prov.get("source_paths") or ["?"])[0]
        vals = [tr.get("docs", 0), tr.get("bytes", 0), tr.get("tokens", 0), va.get("docs", 0), va.get("tokens", 0)]
        tot = [a + (b or 0) for a, b in zip(tot, vals)]
        lines.append(f"{name:20s} {vals[0]:>10,} {vals[1] / 1e6:>9.2f} {_n(vals[2]):>11s} "
                     f"{vals[3]:>10,} {_n(vals[4]):>10s}  {pk[:60]}")
    lines.append("-" * len(head))
    lines.append(f"{'total':20s} {tot[0]:>10,} {tot[1] / 1e6:>9.2f} {tot[2]:>11,} {tot[3]:>10,} {tot[4]:>10,}")
    return "\n".join(lines)


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) and v else "-"


def run_stats(args) -> int:
    from megamix.data.corpus import read_stats

    _, data_dir, _ = _resolve(args)
    path = data_dir / "corpus" / "stats.json"
    if not path.is_file():
        return _fail(f"{path} not found; run `megamix data build` or `megamix data import` first")
    stats = read_stats(data_dir)
    if getattr(args, "json", False):
        print(json.dumps(stats, indent=1))
    else:
        print(format_stats_table(stats))
    return 0

"""Tokenize ``corpus/<domain>/{train,valid}.jsonl`` into ``tokens/<domain>/{train,valid}.{bin,idx}``.

Every document is encoded with the store's tokenizer (``data.tokenizer``: GPT-2 by default, or any Hugging
Face tokenizer), without special tokens, and followed by one EOS token (BERT-style tokenizers: ``[SEP]``).
The token dtype follows the vocabulary size as in Megatron (uint16 below 65,500 ids, else int32). Each
domain's record ``tokens/<domain>/manifest.json`` (see :mod:`megamix.data.manifest`) holds the tokenizer,
vocabulary size, EOS, dtype and per-split document/token counts and largest id; token counts also go into
``corpus/stats.json``. A split whose jsonl (sha256) and tokenizer are unchanged is not re-tokenized.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from megamix.data.corpus import SPLITS, corpus_domains, iter_jsonl, read_stats, update_stats
from megamix.data.errors import DataError
from megamix.data.manifest import load_manifest, load_records, store_meta, write_domain_record
from megamix.data.token_store import IndexedTokenWriter
from megamix.data.tokenizer import GPT2_EOS_ID, get_tokenizer, load_tokenizer, tokenizer_meta

TOKENIZER_FIELDS = ("tokenizer", "vocab_size", "eos_id")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_tokenizer(tokens_dir: str | Path) -> str | None:
    """The tokenizer the records under ``tokens_dir`` agree on (None for an empty/absent store)."""
    recs = load_records(tokens_dir) if Path(tokens_dir).is_dir() else {}
    return store_meta(recs, tokens_dir).get("tokenizer") if recs else None


def resolve_store_tokenizer(tokens_dir: Path, tokenizer: str | None, domains: list[str]) -> dict:
    """The tokenizer meta for (re)building ``domains`` of the store at ``tokens_dir``.

    An empty ``tokenizer`` means the one the store already records, else GPT-2. The other domains of the
    store must use the same tokenizer (a store is read by one model)."""
    records = load_records(tokens_dir) if tokens_dir.is_dir() else {}
    spec = (tokenizer or "").strip()
    if not spec:
        spec = store_meta(records, tokens_dir).get("tokenizer") or "gpt2" if records else "gpt2"
    meta = tokenizer_meta(spec)
    want = tuple(meta[k] for k in TOKENIZER_FIELDS)
    clash = sorted(n for n, r in records.items() if n not in domains
                   and tuple(r.get(k) for k in TOKENIZER_FIELDS) != want)
    if clash:
        r = records[clash[0]]
        raise DataError(f"{tokens_dir}: domains {clash} were tokenized with {r.get('tokenizer')!r} (vocab "
                        f"{r.get('vocab_size')}); tokenizing {domains} with {meta['tokenizer']!r} (vocab "
                        f"{meta['vocab_size']}) would mix tokenizers in one store: re-tokenize every domain "
                        f"(`megamix data tokenize --tokenizer {spec} --force`, no --domains) or use another "
                        "data_dir")
    return meta


def encode_documents(texts: Iterable[str], writer: IndexedTokenWriter, *, batch_docs: int = 256,
                     eos_id: int = GPT2_EOS_ID, progress: bool = False, desc: str = "",
                     tokenizer=None) -> tuple[int, int]:
    """Tokenize ``texts`` in batches (no special tokens), append ``eos_id`` to each, write them; returns
    (docs, tokens). ``tokenizer``: a Hugging Face tokenizer (default: GPT-2)."""
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    docs = tokens = 0
    batch: list[str] = []
    bar = tqdm(unit="doc", desc=desc, file=sys.stderr, disable=not progress, leave=False, mininterval=1.0)

    def flush():
        nonlocal docs, tokens
        if not batch:
            return
        for ids in tok(batch, add_special_tokens=False)["input_ids"]:
            arr = np.empty(len(ids) + 1, dtype=np.int64)
            arr[:-1] = ids
            arr[-1] = eos_id
            writer.add_document(arr)
            tokens += len(arr)
        docs += len(batch)
        bar.update(len(batch))
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) >= batch_docs:
            flush()
    flush()
    bar.close()
    return docs, tokens


def _jsonl_texts(path: Path):
    return (row["text"] for row in iter_jsonl(path))


def tokenize_corpus(data_dir: str | Path, domains: list[str] | None = None, *, force: bool = False,
                    progress: bool = True, tokenizer: str | None = None) -> dict:
    """Tokenize the corpus of ``domains`` (None = all in ``corpus/``); returns the store's merged manifest.

    Args:
        tokenizer: a ``data.tokenizer`` value; empty/None = the tokenizer the store already records, else
            GPT-2. Changing it re-tokenizes the domains given (the others must follow: see
            :func:`resolve_store_tokenizer`).
    """
    data_dir = Path(data_dir)
    available = corpus_domains(data_dir)
    domains = list(domains) if domains else available
    missing = [d for d in domains if d not in available]
    if missing:
        raise FileNotFoundError(f"no corpus for domain(s) {missing} under {data_dir / 'corpus'}; "
                                f"run `megamix data build` or `megamix data import` first")
    if not domains:
        raise FileNotFoundError(f"no corpus under {data_dir / 'corpus'}; run `megamix data build` first")
    tokens_dir = data_dir / "tokens"
    meta = resolve_store_tokenizer(tokens_dir, tokenizer, domains)
    tok = load_tokenizer(meta["tokenizer"])
    dtype = np.dtype(meta["dtype"]).type
    same_tok = tuple(meta[k] for k in TOKENIZER_FIELDS)
    records = load_records(tokens_dir) if tokens_dir.is_dir() else {}
    stats = read_stats(data_dir).get("domains", {})
    for dom in tqdm(domains, desc="tokenize", file=sys.stderr, disable=not progress):
        old = dict(records.get(dom, {}))
        reuse = tuple(old.get(k) for k in TOKENIZER_FIELDS) == same_tok
        entry = {k: v for k, v in old.items() if k not in ("format", "domain")} if reuse else {}
        shas = dict(entry.get("corpus_sha256", {}))
        for split in SPLITS:
            src = data_dir / "corpus" / dom / f"{split}.jsonl"
            prefix = tokens_dir / dom / split
            sha = file_sha256(src) if src.is_file() else None
            if src.is_file() and not force and reuse and shas.get(split) == sha \
                    and prefix.with_suffix(".idx").is_file() and prefix.with_suffix(".bin").is_file():
                continue
            with IndexedTokenWriter(prefix, dtype) as w:
                n_docs, n_tok = encode_documents(_jsonl_texts(src) if src.is_file() else [], w,
                                                 progress=progress, desc=f"{dom}/{split}", tokenizer=tok,
                                                 eos_id=meta["eos_id"])
            entry[f"{split}_docs"], entry[f"{split}_tokens"] = n_docs, n_tok
            entry[f"{split}_max_token_id"] = w.max_token_id
            shas[split] = sha
        entry["corpus_sha256"] = shas
        entry.update(meta)
        write_domain_record(tokens_dir, dom, entry)
        st = stats.get(dom)
        if st is not None:
            for split in SPLITS:
                st.setdefault(split, {})["tokens"] = entry[f"{split}_tokens"]
            update_stats(data_dir, {dom: st})
    return load_manifest(tokens_dir)

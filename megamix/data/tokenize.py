"""Tokenize ``corpus/<domain>/{train,valid}.jsonl`` into ``tokens/<domain>/{train,valid}.{bin,idx}``.

Every document is GPT-2 BPE encoded and followed by one EOS token (50256). ``tokens/manifest.json``
records the tokenizer and per-domain token/document counts; the token counts are also written
into ``corpus/stats.json``. A split whose jsonl has not changed (same sha256) is not re-tokenized.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from megamix.data.corpus import SPLITS, atomic_write_json, read_stats, update_stats
from megamix.data.store import MANIFEST
from megamix.data.token_store import IndexedTokenDataset, IndexedTokenWriter, best_dtype
from megamix.data.tokenizer import GPT2_EOS_ID, GPT2_VOCAB_SIZE, get_tokenizer


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def corpus_domains(data_dir: str | Path) -> list[str]:
    """Domains that have a ``corpus/<domain>/train.jsonl``."""
    root = Path(data_dir) / "corpus"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file())


def read_manifest_or_new(tokens_dir: Path) -> dict:
    path = tokens_dir / MANIFEST
    if path.is_file():
        return json.loads(path.read_text())
    return {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eos_id": GPT2_EOS_ID,
            "dtype": np.dtype(best_dtype(GPT2_VOCAB_SIZE)).name, "domains": {}}


def encode_documents(texts: Iterable[str], writer: IndexedTokenWriter, *, batch_docs: int = 256,
                     eos_id: int = GPT2_EOS_ID, progress: bool = False, desc: str = "") -> tuple[int, int]:
    """Tokenize ``texts`` in batches, append EOS to each, write them; returns (docs, tokens)."""
    tok = get_tokenizer()
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
    from megamix.data.corpus import iter_jsonl
    return (row["text"] for row in iter_jsonl(path))


def tokenize_corpus(data_dir: str | Path, domains: list[str] | None = None, *, force: bool = False,
                    progress: bool = True) -> dict:
    """Tokenize the corpus of ``domains`` (None = all in ``corpus/``); returns the manifest."""
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
    manifest = read_manifest_or_new(tokens_dir)
    dtype = np.dtype(manifest.get("dtype", "uint16")).type
    stats_updates: dict[str, dict] = {}
    stats = read_stats(data_dir).get("domains", {})
    for dom in tqdm(domains, desc="tokenize", file=sys.stderr, disable=not progress):
        entry = dict(manifest["domains"].get(dom, {}))
        shas = dict(entry.get("corpus_sha256", {}))
        for split in SPLITS:
            src = data_dir / "corpus" / dom / f"{split}.jsonl"
            prefix = tokens_dir / dom / split
            sha = file_sha256(src) if src.is_file() else None
            if src.is_file() and not force and shas.get(split) == sha \
                    and prefix.with_suffix(".idx").is_file() and prefix.with_suffix(".bin").is_file():
                continue
            with IndexedTokenWriter(prefix, dtype) as w:
                n_docs, n_tok = encode_documents(_jsonl_texts(src) if src.is_file() else [], w,
                                                 progress=progress, desc=f"{dom}/{split}")
            entry[f"{split}_docs"], entry[f"{split}_tokens"] = n_docs, n_tok
            shas[split] = sha
        entry["corpus_sha256"] = shas
        manifest["domains"][dom] = entry
        st = stats.get(dom)
        if st is not None:
            for split in SPLITS:
                st.setdefault(split, {})["tokens"] = entry[f"{split}_tokens"]
            stats_updates[dom] = st
    manifest["domains"] = dict(sorted(manifest["domains"].items()))
    atomic_write_json(tokens_dir / MANIFEST, manifest)
    if stats_updates:
        update_stats(data_dir, stats_updates)
    return manifest


def verify_split(tokens_dir: Path, domain: str, split: str, manifest: dict) -> None:
    """Check that a split's files agree with the manifest counts (raises ValueError)."""
    ds = IndexedTokenDataset(tokens_dir / domain / split)
    e = manifest["domains"][domain]
    if len(ds) != e[f"{split}_docs"] or ds.num_tokens != e[f"{split}_tokens"]:
        raise ValueError(f"{domain}/{split}: files have {len(ds)} docs/{ds.num_tokens} tokens, "
                         f"manifest says {e[f'{split}_docs']}/{e[f'{split}_tokens']}")

"""Bring your own data: import one domain from JSONL, Parquet, a Hugging Face ``save_to_disk``
folder or an existing Megatron ``.bin/.idx`` store into the megamix corpus/token layout.

Text formats go through the same normalisation, exact de-duplication and seeded train/valid split
as the built-in corpus, then get tokenized. Megatron stores keep their token ids (no
re-tokenization); each document gets exactly one trailing EOS and the corpus jsonl holds the
decoded text, so ``megamix data stats`` and Domain2Vec see the same documents.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megamix.data.corpus import (SPLITS, assign_splits, atomic_write_lines, read_stats,
                                 update_stats, write_domain)
from megamix.data.store import MANIFEST
from megamix.data.token_store import IndexedTokenDataset, IndexedTokenWriter, best_dtype
from megamix.data.tokenize import atomic_write_json, file_sha256, read_manifest_or_new, tokenize_corpus
from megamix.data.tokenizer import GPT2_EOS_ID, GPT2_VOCAB_SIZE

FORMATS = ("jsonl", "parquet", "hf", "megatron")


class DataImportError(ValueError):
    """The input cannot be imported; the message says why and how to fix it."""


def detect_format(path: Path) -> str:
    """Guess the input format from the path."""
    s = str(path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                          or (path / "state.json").is_file()):
        return "hf"
    if s.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if s.endswith(".parquet") or (path.is_dir() and any(path.glob("*.parquet"))):
        return "parquet"
    if Path(s + ".idx").is_file() or s.endswith((".idx", ".bin")):
        return "megatron"
    raise DataImportError(f"cannot tell the format of {path}; pass --format one of {FORMATS}")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    from megamix.data.corpus import iter_json_lines

    n = 0
    try:
        for lineno, row in iter_json_lines(path):
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataImportError(f"{path}:{lineno}: no text field {text_field!r} "
                                      f"(fields: {keys}); pass --text-field")
            if not isinstance(row[text_field], str):
                raise DataImportError(f"{path}:{lineno}: field {text_field!r} is "
                                      f"{type(row[text_field]).__name__}, expected a string")
            n += 1
            yield row[text_field], f"{path}#{lineno}"
    except DataImportError:
        raise
    except ValueError as e:  # malformed JSON line
        raise DataImportError(str(e)) from e
    if n == 0:
        raise DataImportError(f"{path} is empty: no JSON lines found")


def _iter_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataImportError(f"{f}: no column {text_field!r} (columns: {names}); pass --text-field")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for v in batch.column(0).to_pylist():
                row += 1
                if v is None:
                    continue
                if not isinstance(v, str):
                    raise DataImportError(f"{f}: column {text_field!r} holds {type(v).__name__}, not text")
                n += 1
                yield v, f"{f}#{row}"
    if n == 0:
        raise DataImportError(f"{path} holds no rows with text in {text_field!r}")


def _iter_hf(path: Path, text_field: str, hf_split: str | None) -> Iterator[tuple[str, str]]:
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a bad folder
        raise DataImportError(f"{path} is not a Hugging Face save_to_disk folder: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        split = hf_split or ("train" if "train" in ds else names[0])
        if split not in ds:
            raise DataImportError(f"{path} has splits {names}; --hf-split {split!r} is not one of them")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataImportError(f"{path}: no column {text_field!r} (columns: {ds.column_names}); "
                           "pass --text-field")
    if len(ds) == 0:
        raise DataImportError(f"{path} is an empty dataset")
    for i, v in enumerate(ds[text_field] if len(ds) < 200_000 else (r[text_field] for r in ds)):
        if v is None:
            continue
        if not isinstance(v, str):
            raise DataImportError(f"{path}: column {text_field!r} holds {type(v).__name__}, not text")
        yield v, f"{path}#{i}"


def _nonempty(it: Iterator[tuple[str, str]], path: Path) -> Iterator[tuple[str, str]]:
    n = 0
    for x in it:
        n += 1
        yield x
    if n == 0:
        raise DataImportError(f"{path} holds no documents")


def import_text_domain(data_dir: str | Path, domain: str, path: str | Path, *, fmt: str | None = None,
                       text_field: str = "text", hf_split: str | None = None,
                       valid_fraction: float = 0.05, seed: int = 1234, cap_mb: float | None = None,
                       max_docs: int | None = None, tokenize: bool = True, progress: bool = True) -> dict:
    """Import one domain from jsonl / parquet / HF; returns its ``stats.json`` entry."""
    path = Path(path)
    if not path.exists() and not Path(str(path) + ".idx").is_file():
        raise DataImportError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataImportError(f"unknown format {fmt!r}; use one of {FORMATS}")
    if fmt == "megatron":
        return import_megatron_domain(data_dir, domain, path, valid_fraction=valid_fraction, seed=seed,
                                      progress=progress)
    if fmt == "jsonl":
        it = _iter_jsonl(path, text_field)
    elif fmt == "parquet":
        it = _iter_parquet(path, text_field)
    else:
        it = _iter_hf(path, text_field, hf_split)
    prov = {"description": f"imported from {fmt}", "packages": [], "source_paths": [str(path.resolve())],
            "license": "user-provided", "license_files": [], "format": fmt, "text_field": text_field}
    try:
        entry = write_domain(data_dir, domain, _nonempty(it, path),
                             cap_bytes=int(cap_mb * 1e6) if cap_mb else None,
                             valid_fraction=valid_fraction, seed=seed, max_docs=max_docs,
                             max_doc_chars=None, provenance=prov, progress=progress)
    except RuntimeError as e:  # EmptyDomainError
        raise DataImportError(f"{path}: {e}") from e
    entry["imported"] = True
    update_stats(data_dir, {domain: entry})
    if tokenize:
        tokenize_corpus(data_dir, [domain], progress=progress)
    return read_stats(data_dir)["domains"][domain]


def import_megatron_domain(data_dir: str | Path, domain: str, prefix: str | Path, *,
                           vocab_size: int | None = None, valid_fraction: float = 0.05, seed: int = 1234,
                           decode_text: bool = True, progress: bool = True) -> dict:
    """Import an existing Megatron ``.bin/.idx`` store (GPT-2 token ids) as one domain.

    Args:
        prefix: the path prefix (``.../my_text_document``), with or without ``.bin``/``.idx``.
        vocab_size: the vocabulary the store was tokenized with, if known; must be GPT-2's 50257.
        decode_text: also write the decoded text to ``corpus/<domain>/*.jsonl``.

    Raises :class:`DataImportError` for a missing/empty store or a vocabulary mismatch (a declared
    ``vocab_size`` other than 50257, or token ids >= 50257).
    """
    data_dir = Path(data_dir)
    if vocab_size is not None and vocab_size != GPT2_VOCAB_SIZE:
        raise DataImportError(f"vocab-size mismatch: the store was tokenized with a {vocab_size}-token "
                           f"vocabulary but megamix token stores use GPT-2 ({GPT2_VOCAB_SIZE}); "
                           "re-tokenize the text with the GPT-2 tokenizer or import the raw text")
    try:
        src = IndexedTokenDataset(prefix)
    except (FileNotFoundError, ValueError) as e:
        raise DataImportError(f"cannot read Megatron store {prefix}: {e}") from e
    if len(src) == 0 or src.num_tokens == 0:
        raise DataImportError(f"Megatron store {prefix} is empty ({len(src)} documents, {src.num_tokens} tokens)")
    if not np.issubdtype(src.dtype, np.integer):
        raise DataImportError(f"Megatron store {prefix} holds {np.dtype(src.dtype).name} values, not token ids")
    toks = np.asarray(src.tokens)
    lo, hi = int(toks.min()), int(toks.max())
    if lo < 0 or hi >= GPT2_VOCAB_SIZE:
        raise DataImportError(f"vocab-size mismatch: {prefix} has token ids in [{lo}, {hi}] but the GPT-2 "
                           f"vocabulary has {GPT2_VOCAB_SIZE} ids; it was tokenized with another "
                           "tokenizer. Re-tokenize with GPT-2 or import the raw text instead")
    tok = None
    if decode_text:
        from megamix.data.tokenizer import get_tokenizer
        tok = get_tokenizer()
    tokens_dir = data_dir / "tokens"
    manifest = read_manifest_or_new(tokens_dir)
    dtype = np.dtype(manifest.get("dtype", np.dtype(best_dtype(GPT2_VOCAB_SIZE)).name)).type
    rows: dict[str, list[str]] = {sp: [] for sp in SPLITS}
    counts = {sp: {"docs": 0, "tokens": 0, "bytes": 0} for sp in SPLITS}
    keep: list[tuple[int, str, int]] = []  # (document index, dedup key, tokens)
    seen: set[str] = set()
    dup = 0
    for i in range(len(src)):
        ids = src[i]
        if ids.size and ids[-1] == GPT2_EOS_ID:
            ids = ids[:-1]
        if ids.size == 0:
            continue
        key = hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest()
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        keep.append((i, key, int(ids.size)))
    if not keep:
        raise DataImportError(f"Megatron store {prefix}: every document is empty")
    splits = assign_splits([k for _, k, _ in keep], seed, valid_fraction, [n for _, _, n in keep])
    writers = {sp: IndexedTokenWriter(tokens_dir / domain / sp, dtype) for sp in SPLITS}
    try:
        for (i, _, _), is_val in tqdm(list(zip(keep, splits)), desc=f"import {domain}", file=sys.stderr,
                                   disable=not progress, leave=False):
            ids = src[i].astype(np.int64)
            if ids[-1] == GPT2_EOS_ID:
                ids = ids[:-1]
            sp = "valid" if is_val else "train"
            doc = np.append(ids, GPT2_EOS_ID)
            writers[sp].add_document(doc)
            counts[sp]["docs"] += 1
            counts[sp]["tokens"] += int(doc.size)
            if tok is not None:
                text = tok.decode(ids.tolist())
                counts[sp]["bytes"] += len(text.encode("utf-8"))
                rows[sp].append(json.dumps({"text": text, "source": f"{prefix}#{i}"}, ensure_ascii=False))
        if counts["train"]["docs"] == 0:
            raise DataImportError(f"Megatron store {prefix}: no non-empty training documents")
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    corpus = data_dir / "corpus" / domain
    for sp in SPLITS:
        atomic_write_lines(corpus / f"{sp}.jsonl", rows[sp])
    entry = {sp: dict(counts[sp]) for sp in SPLITS}
    entry.update({"duplicates_dropped": dup, "short_dropped": 0, "cap_bytes": None, "imported": True,
                  "provenance": {"description": "imported from a Megatron .bin/.idx store", "packages": [],
                                 "source_paths": [str(Path(str(prefix)).resolve())],
                                 "license": "user-provided", "license_files": [], "format": "megatron",
                                 "source_dtype": np.dtype(src.dtype).name}})
    update_stats(data_dir, {domain: entry})
    manifest["domains"][domain] = {
        "train_docs": counts["train"]["docs"], "train_tokens": counts["train"]["tokens"],
        "valid_docs": counts["valid"]["docs"], "valid_tokens": counts["valid"]["tokens"],
        # the jsonl is derived from the tokens here; recording its hash stops `tokenize` from
        # re-encoding the decoded text (which would not reproduce the original ids exactly)
        "corpus_sha256": {sp: file_sha256(corpus / f"{sp}.jsonl") for sp in SPLITS},
        "source": "megatron"}
    manifest["domains"] = dict(sorted(manifest["domains"].items()))
    atomic_write_json(tokens_dir / MANIFEST, manifest)
    return entry

"""Bring your own data: import one domain from JSONL, Parquet, a Hugging Face ``save_to_disk``
folder or an existing Megatron ``.bin/.idx`` store into the megamix corpus/token layout.

Text formats go through the same normalisation, exact de-duplication and seeded train/valid split
as the built-in corpus, then get tokenized with the store's tokenizer. A saved ``DatasetDict`` keeps its
own ``validation`` (or ``valid``/``val``/``dev``) split instead of re-splitting train. Megatron stores keep
their token ids (no re-tokenization; they must come from the store's tokenizer, whatever its size); each
document gets exactly one trailing EOS and the corpus jsonl holds the decoded text, so
``megamix data stats`` and Domain2Vec see the same documents. (To train on Megatron files or tokenised
Arrow datasets without copying them, use ``data.paths``: :mod:`megamix.data.backings`.)
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megamix.data.backings import VALID_SPLIT_NAMES
from megamix.data.corpus import SPLITS, assign_splits, read_stats, update_stats, write_domain
from megamix.data.errors import DataError, check_domain_name
from megamix.data.manifest import write_domain_record
from megamix.data.token_store import IndexedTokenDataset, IndexedTokenWriter
from megamix.data.tokenize import file_sha256, resolve_store_tokenizer, tokenize_corpus
from megamix.io import atomic_write_lines, iter_json_lines

FORMATS = ("jsonl", "parquet", "hf", "megatron")


class DataImportError(DataError):
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


def _hf_rows(ds, path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    if text_field not in ds.column_names:
        hint = (" (already tokenised? train on it in place with data.paths instead)"
                if "input_ids" in ds.column_names else "")
        raise DataImportError(f"{path}: no column {text_field!r} (columns: {ds.column_names}); "
                              f"pass --text-field{hint}")
    if len(ds) == 0:
        raise DataImportError(f"{path} is an empty dataset")
    for i, v in enumerate(ds[text_field] if len(ds) < 200_000 else (r[text_field] for r in ds)):
        if v is None:
            continue
        if not isinstance(v, str):
            raise DataImportError(f"{path}: column {text_field!r} holds {type(v).__name__}, not text")
        yield v, f"{path}#{i}"


def _hf_splits(path: Path, text_field: str, hf_split: str | None):
    """``(train rows, validation rows or None, validation split name or None)`` of a saved dataset: a
    ``DatasetDict`` keeps its own validation split (the first of :data:`VALID_SPLIT_NAMES` it has)."""
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a bad folder
        raise DataImportError(f"{path} is not a Hugging Face save_to_disk folder: {e}") from e
    if not isinstance(ds, datasets.DatasetDict):
        return _hf_rows(ds, path, text_field), None, None
    names = list(ds.keys())
    split = hf_split or ("train" if "train" in ds else names[0])
    if split not in ds:
        raise DataImportError(f"{path} has splits {names}; --hf-split {split!r} is not one of them")
    vname = next((n for n in VALID_SPLIT_NAMES if n in ds and n != split), None)
    valid = _hf_rows(ds[vname], path / vname, text_field) if vname else None
    return _hf_rows(ds[split], path / split, text_field), valid, vname


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
                       max_docs: int | None = None, tokenize: bool = True, progress: bool = True,
                       tokenizer: str | None = None) -> dict:
    """Import one domain from jsonl / parquet / HF; returns its ``stats.json`` entry.

    ``tokenizer``: a ``data.tokenizer`` value (empty = the store's, else GPT-2)."""
    check_domain_name(domain, "--domain")
    path = Path(path)
    if not path.exists() and not Path(str(path) + ".idx").is_file():
        raise DataImportError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataImportError(f"unknown format {fmt!r}; use one of {FORMATS}")
    if fmt == "megatron":
        return import_megatron_domain(data_dir, domain, path, valid_fraction=valid_fraction, seed=seed,
                                      progress=progress, tokenizer=tokenizer)
    if tokenize:  # refuse a tokenizer clash before anything is written
        resolve_store_tokenizer(Path(data_dir) / "tokens", tokenizer, [domain])
    valid_it, valid_name = None, None
    if fmt == "jsonl":
        it = _iter_jsonl(path, text_field)
    elif fmt == "parquet":
        it = _iter_parquet(path, text_field)
    else:
        it, valid_it, valid_name = _hf_splits(path, text_field, hf_split)
    prov = {"description": f"imported from {fmt}", "packages": [], "source_paths": [str(path.resolve())],
            "license": "user-provided", "license_files": [], "format": fmt, "text_field": text_field}
    if valid_name:
        prov["validation_split"] = valid_name  # the dataset's own split, not re-split from train
    try:
        entry = write_domain(data_dir, domain, _nonempty(it, path),
                             cap_bytes=int(cap_mb * 1e6) if cap_mb else None,
                             valid_fraction=valid_fraction, seed=seed, max_docs=max_docs,
                             max_doc_chars=None, provenance=prov, progress=progress, valid_docs=valid_it)
    except RuntimeError as e:  # EmptyDomainError
        raise DataImportError(f"{path}: {e}") from e
    entry["imported"] = True
    update_stats(data_dir, {domain: entry})
    if tokenize:
        tokenize_corpus(data_dir, [domain], progress=progress, tokenizer=tokenizer)
    return read_stats(data_dir)["domains"][domain]


def import_megatron_domain(data_dir: str | Path, domain: str, prefix: str | Path, *,
                           vocab_size: int | None = None, valid_fraction: float = 0.05, seed: int = 1234,
                           decode_text: bool = True, progress: bool = True, tokenizer: str | None = None) -> dict:
    """Copy an existing Megatron ``.bin/.idx`` store into the megamix store as one domain.

    Args:
        prefix: the path prefix (``.../my_text_document``), with or without ``.bin``/``.idx``.
        vocab_size: the vocabulary the files were tokenized with, if known; must equal the tokenizer's.
        decode_text: also write the decoded text to ``corpus/<domain>/*.jsonl``.
        tokenizer: the tokenizer the files were made with (a ``data.tokenizer`` value; empty = the store's,
            else GPT-2). Its vocabulary, EOS and dtype become the domain's.

    Raises :class:`DataImportError` for a missing/corrupt/empty store or a vocabulary mismatch (a declared
    ``vocab_size`` other than the tokenizer's, or token ids outside its vocabulary).
    """
    check_domain_name(domain, "--domain")
    data_dir = Path(data_dir)
    tokens_dir = data_dir / "tokens"
    meta = resolve_store_tokenizer(tokens_dir, tokenizer, [domain])
    eos = int(meta["eos_id"])
    src = _open_megatron_store(prefix, meta, vocab_size)
    tok = None
    if decode_text:
        from megamix.data.tokenizer import load_tokenizer
        tok = load_tokenizer(meta["tokenizer"])
    keep, dup = _unique_documents(src, eos)
    if not keep:
        raise DataImportError(f"Megatron store {prefix}: every document is empty")
    splits = assign_splits([k for _, k, _ in keep], seed, valid_fraction, [n for _, _, n in keep])
    rows, counts, max_ids = _copy_documents(src, keep, splits, tokens_dir / domain, np.dtype(meta["dtype"]).type,
                                            eos=eos, tok=tok, prefix=prefix, desc=f"import {domain}",
                                            progress=progress)
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
    record = {**meta}
    for sp in SPLITS:
        record[f"{sp}_docs"], record[f"{sp}_tokens"] = counts[sp]["docs"], counts[sp]["tokens"]
        record[f"{sp}_max_token_id"] = max_ids[sp]
    # the jsonl is derived from the tokens here; recording its hash stops `tokenize` from
    # re-encoding the decoded text (which would not reproduce the original ids exactly)
    record["corpus_sha256"] = {sp: file_sha256(corpus / f"{sp}.jsonl") for sp in SPLITS}
    record["source"] = "megatron"
    write_domain_record(tokens_dir, domain, record)
    return entry


def _open_megatron_store(prefix: str | Path, meta: dict, vocab_size: int | None) -> IndexedTokenDataset:
    """The Megatron store at ``prefix``, once it is known to hold token ids of the tokenizer ``meta`` (and of
    the declared ``vocab_size``, if any); a :class:`DataImportError` says what does not fit."""
    vocab = int(meta["vocab_size"])
    if vocab_size is not None and vocab_size != vocab:
        raise DataImportError(f"vocab-size mismatch: the store was tokenized with a {vocab_size}-token "
                              f"vocabulary but the tokenizer {meta['tokenizer']!r} has {vocab}; pass the tokenizer "
                              "the files were made with (--tokenizer, or data.tokenizer)")
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
    if lo < 0 or hi >= vocab:
        raise DataImportError(f"vocab-size mismatch: {prefix} has token ids in [{lo}, {hi}] but the tokenizer "
                              f"{meta['tokenizer']!r} has {vocab} ids; pass the tokenizer the files were made "
                              "with (--tokenizer, or data.tokenizer)")
    return src


def _unique_documents(src: IndexedTokenDataset, eos: int) -> tuple[list[tuple[int, str, int]], int]:
    """``(document index, dedup key, tokens)`` of every non-empty document of ``src`` whose ids (a trailing
    EOS aside) are not those of an earlier one, and how many duplicates were dropped."""
    keep: list[tuple[int, str, int]] = []
    seen: set[str] = set()
    dup = 0
    for i in range(len(src)):
        ids = src[i]
        if ids.size and ids[-1] == eos:
            ids = ids[:-1]
        if ids.size == 0:
            continue
        key = hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest()
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        keep.append((i, key, int(ids.size)))
    return keep, dup


def _copy_documents(src: IndexedTokenDataset, keep: list[tuple[int, str, int]], splits: list[bool], out: Path,
                    dtype, *, eos: int, tok, prefix: str | Path, desc: str, progress: bool):
    """Write the kept documents (each with exactly one trailing EOS) to ``out/{train,valid}``; with ``tok`` also
    decode them. Returns the jsonl rows and the docs/tokens/bytes counts per split, and each split's largest
    token id. Nothing is left behind on failure."""
    rows: dict[str, list[str]] = {sp: [] for sp in SPLITS}
    counts = {sp: {"docs": 0, "tokens": 0, "bytes": 0} for sp in SPLITS}
    writers = {sp: IndexedTokenWriter(out / sp, dtype) for sp in SPLITS}
    try:
        for (i, _, _), is_val in tqdm(list(zip(keep, splits)), desc=desc, file=sys.stderr,
                                      disable=not progress, leave=False):
            ids = src[i].astype(np.int64)
            if ids[-1] == eos:
                ids = ids[:-1]
            sp = "valid" if is_val else "train"
            doc = np.append(ids, eos)
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
    return rows, counts, {sp: writers[sp].max_token_id for sp in SPLITS}

"""Token data used in place: Megatron ``.bin/.idx`` blends and tokenised Arrow datasets, plus :func:`open_store`.

``data.paths`` takes Megatron's blend forms::

    data.paths: [0.3, /data/web_text_document, 0.7, /data/code_text_document]   # weight, prefix, ...
    data.paths: [/data/web_text_document, /data/code_text_document]               # no weights: natural
    data.paths: {web: /data/web_text_document, code: [/data/c1_text_document, /data/c2_text_document]}

Each prefix (or each group of the mapping form) is one domain, named by the mapping key or by the prefix's
basename without Megatron's ``_text_document`` suffix. A path that is a folder is a Hugging Face
``save_to_disk`` dataset (``Dataset`` or ``DatasetDict``) with an ``input_ids`` column. Blend weights are
normalised as Megatron does and become the natural (initial) mixture. Files are memory-mapped, never
copied or rewritten: a domain's split is a :class:`~megamix.data.views.DocumentView` over them.

Validation documents come, per domain, from ``data.valid_paths`` (same forms; domain names must match),
else from a ``DatasetDict``'s own ``validation``/``valid`` split, else from a deterministic held-out split:
document ``i`` of a source is held out when a seeded hash of ``(data.seed, domain, source, i)`` falls below
``data.valid_fraction`` (:func:`~megamix.data.views.holdout_mask`); the store's record says which.

Token ids are checked against the vocabulary (``data.tokenizer`` when set, and the model's in the trainer):
each source's largest id comes from a scan of up to ``data.vocab_check_mb`` MB (the whole file when smaller,
else evenly spaced blocks; ``-1`` reads every file whole); the record says how much was read.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamix.data.errors import DataError, check_domain_name
from megamix.data.store import DomainData, TokenStore
from megamix.data.token_store import check_index
from megamix.data.views import DocumentPart, DocumentView, holdout_mask, scan_ids

TOKEN_COLUMN = "input_ids"
VALID_SPLIT_NAMES = ("validation", "valid", "val", "dev")
MEGATRON_SUFFIX = "_text_document"


@dataclass
class Group:
    """One domain of ``data.paths``: its name, its source paths, and its blend weight (None = natural)."""

    name: str
    paths: list[str]
    weight: float | None = None


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    if isinstance(x, str):
        try:
            float(x)
            return not re.search(r"[/\\]", x)
        except ValueError:
            return False
    return False


def _path_str(p, where: str) -> str:
    if not isinstance(p, (str, Path)) or not str(p).strip():
        raise DataError(f"{where}: expected a path (a Megatron prefix or a dataset folder), got {p!r}")
    return str(p).strip()


def domain_name_for(path: str) -> str:
    """The domain name of a path in the list form: its basename without ``.bin``/``.idx`` and without
    Megatron's ``_text_document`` suffix (``/data/web_text_document`` -> ``web``)."""
    base = Path(path.rstrip("/")).name
    for ext in (".bin", ".idx"):
        if base.endswith(ext):
            base = base[:-len(ext)]
    if base.endswith(MEGATRON_SUFFIX) and len(base) > len(MEGATRON_SUFFIX):
        base = base[:-len(MEGATRON_SUFFIX)]
    return base


def parse_paths(value, where: str = "data.paths") -> list[Group]:
    """Parse a ``data.paths`` / ``data.valid_paths`` value (checks the form only, not the files)."""
    if value is None or value == [] or value == {}:
        return []
    if isinstance(value, (str, Path)):
        value = [value]
    groups: list[Group] = []
    if isinstance(value, dict):
        for name, paths in value.items():
            check_domain_name(str(name), f"{where}.{name}")
            items = paths if isinstance(paths, (list, tuple)) else [paths]
            if not items:
                raise DataError(f"{where}.{name}: empty list; give at least one prefix")
            groups.append(Group(str(name), [_path_str(p, f"{where}.{name}") for p in items]))
    elif isinstance(value, (list, tuple)):
        numbers = [_is_number(x) for x in value]
        if any(numbers):
            if len(value) % 2 or not all(numbers[0::2]) or any(numbers[1::2]):
                raise DataError(f"{where}: a weighted blend alternates weight and prefix, "
                                f"[w1, prefix1, w2, prefix2, ...]; got {list(value)!r}")
            for i in range(0, len(value), 2):
                w = float(value[i])
                if not (math.isfinite(w) and w > 0):
                    raise DataError(f"{where}[{i}]: blend weight {value[i]!r} must be a finite number > 0 "
                                    "(drop the entry to leave a prefix out)")
                p = _path_str(value[i + 1], f"{where}[{i + 1}]")
                groups.append(Group(domain_name_for(p), [p], w))
        else:
            for i, p in enumerate(value):
                p = _path_str(p, f"{where}[{i}]")
                groups.append(Group(domain_name_for(p), [p]))
        for g in groups:
            check_domain_name(g.name, f"{where}: the domain name derived from {g.paths[0]}")
    else:
        raise DataError(f"{where}: expected a list [w1, prefix1, ...] or [prefix, ...], or a mapping "
                        f"{{domain: prefix | [prefixes]}}; got {type(value).__name__}")
    seen: dict[str, str] = {}
    for g in groups:
        if g.name in seen:
            raise DataError(f"{where}: two entries give the domain name {g.name!r} ({seen[g.name]} and "
                            f"{g.paths[0]}); use the mapping form {{name: prefix}} to name them")
        seen[g.name] = g.paths[0]
    return groups


# ----------------------------------------------------------------------------- one source
@dataclass
class Source:
    """The documents of one path: its training part, and its own validation part if it has one."""

    path: str
    kind: str                        # "megatron" | "arrow"
    train: list[DocumentPart]
    valid: list[DocumentPart] | None
    dtype: str
    arrays: list[np.ndarray]         # every token array (for the id scan)


def _megatron_source(path: str) -> Source:
    info = check_index(path)
    if not np.issubdtype(info.dtype, np.integer):
        raise DataError(f"{info.bin_path}: holds {np.dtype(info.dtype).name} values, not token ids; pass a "
                        "token file (Megatron's preprocess_data.py output)")
    tokens = (np.memmap(info.bin_path, dtype=info.dtype, mode="r", shape=(info.num_tokens,))
              if info.num_tokens else np.zeros(0, dtype=info.dtype))
    return Source(path, "megatron", [DocumentPart(tokens, info.doc_offsets)], None, np.dtype(info.dtype).name,
                  [tokens])


def _arrow_parts(ds, path: str, split: str | None) -> tuple[list[DocumentPart], list[np.ndarray], str]:
    import pyarrow as pa

    where = f"{path}" + (f" (split {split!r})" if split else "")
    if TOKEN_COLUMN not in ds.column_names:
        raise DataError(f"{where}: no {TOKEN_COLUMN!r} column (columns: {ds.column_names}); tokenise it first "
                        f"(dataset.map(lambda b: tokenizer(b['text']), batched=True)) and save_to_disk again, "
                        "or import the text with `megamix data import`")
    if getattr(ds, "_indices", None) is not None:
        raise DataError(f"{where}: has an indices mapping (select/shuffle without flatten); call "
                        "dataset.flatten_indices() before save_to_disk")
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    col = table.column(TOKEN_COLUMN)
    parts, arrays, dtype = [], [], None
    for chunk in col.chunks:
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)) \
                or not pa.types.is_integer(chunk.type.value_type):
            raise DataError(f"{where}: column {TOKEN_COLUMN!r} has type {chunk.type}, expected a list of integer "
                            "token ids per row")
        if chunk.null_count:
            raise DataError(f"{where}: column {TOKEN_COLUMN!r} has {chunk.null_count} null rows; drop them "
                            "(dataset.filter) and save_to_disk again")
        values = chunk.flatten()
        if values.null_count:
            raise DataError(f"{where}: column {TOKEN_COLUMN!r} holds null token ids")
        flat = values.to_numpy(zero_copy_only=True)
        offs = np.asarray(chunk.offsets, dtype=np.int64)
        parts.append(DocumentPart(flat, offs - offs[0]))
        arrays.append(flat)
        dtype = flat.dtype.name
    return parts, arrays, dtype or "int64"


def _arrow_source(path: str) -> Source:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a requirement
        raise DataError(f"{path}: reading a saved Arrow dataset needs the 'datasets' package") from e
    try:
        obj = datasets.load_from_disk(path)   # memory-maps the Arrow files
    except Exception as e:  # datasets raises several types for a folder that is not a saved dataset
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: a folder, but not a Hugging Face save_to_disk dataset ({msg[:160]}); pass a "
                        "Megatron prefix or a folder written by Dataset.save_to_disk") from None
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj.keys())
        if "train" not in obj:
            raise DataError(f"{path}: DatasetDict with splits {names} has no 'train' split; save the training "
                            "data as 'train' (and validation as 'validation')")
        train, arrays, dtype = _arrow_parts(obj["train"], path, "train")
        valid = None
        vname = next((n for n in VALID_SPLIT_NAMES if n in obj), None)
        if vname is not None:
            valid, more, _ = _arrow_parts(obj[vname], path, vname)
            arrays = arrays + more
        return Source(path, "arrow", train, valid, dtype, arrays)
    train, arrays, dtype = _arrow_parts(obj, path, None)
    return Source(path, "arrow", train, None, dtype, arrays)


def open_source(path: str) -> Source:
    """A Megatron prefix (``.bin/.idx``; with or without the extension) or a saved Arrow dataset folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _arrow_source(str(p))
    return _megatron_source(str(p))


# ----------------------------------------------------------------------------- the store
def _count(parts: list[DocumentPart]) -> tuple[int, int]:
    docs = tokens = 0
    for part in parts:
        offs = part.doc_offsets
        sel = np.arange(len(offs) - 1) if part.select is None else part.select
        docs += len(sel)
        tokens += int((offs[sel + 1] - offs[sel]).sum())
    return docs, tokens


def _scan(sources: list[Source], budget_bytes: int | None, vocab: int | None, tokenizer) -> tuple[int, str]:
    """Largest token id over ``sources`` (each read up to ``budget_bytes``, None = whole) and how much was read;
    negative ids, and ids beyond ``vocab`` when the tokenizer is known, are errors naming the file."""
    hi, scanned, total = -1, 0, 0
    for s in sources:
        itemsize = np.dtype(s.dtype).itemsize
        r = scan_ids(s.arrays, None if budget_bytes is None else max(1, budget_bytes // itemsize))
        if r.total and r.min_id < 0:
            raise DataError(f"{s.path}: holds negative token id {r.min_id}; these are not token ids of any "
                            "tokenizer (wrong dtype, or not a token file)")
        if vocab is not None and r.max_id >= vocab:
            raise DataError(f"{s.path}: holds token id {r.max_id} >= {vocab}, the vocabulary of data.tokenizer="
                            f"{tokenizer!r}; set data.tokenizer to the tokenizer the data was made with")
        hi, scanned, total = max(hi, r.max_id), scanned + r.scanned, total + r.total
    how = "all tokens read" if scanned >= total else f"scanned {scanned} of {total} tokens"
    return hi, how


def open_inplace_store(data_cfg, *, model_vocab_size: int | None = None) -> TokenStore:
    """A :class:`TokenStore` over ``data.paths`` (and ``data.valid_paths``) without copying anything.

    ``data_cfg`` needs ``paths``, ``valid_paths``, ``tokenizer``, ``valid_fraction``, ``seed`` and
    ``vocab_check_mb``. With ``model_vocab_size`` the store is also checked against the model.
    """
    from megamix.data.tokenizer import tokenizer_meta

    groups = parse_paths(data_cfg.paths, "data.paths")
    if not groups:
        raise DataError("data.paths is empty; give Megatron prefixes or dataset folders")
    valid_groups = {g.name: g for g in parse_paths(getattr(data_cfg, "valid_paths", None), "data.valid_paths")}
    unknown = sorted(set(valid_groups) - {g.name for g in groups})
    if unknown:
        raise DataError(f"data.valid_paths names domains {unknown} that data.paths does not have "
                        f"({[g.name for g in groups]}); use the mapping form {{train_domain: prefix}}")
    tok_spec = (getattr(data_cfg, "tokenizer", "") or "").strip()
    meta = {"tokenizer": None, "vocab_size": None, "eos_id": None}
    if tok_spec:
        meta = tokenizer_meta(tok_spec)
    vocab = meta.get("vocab_size")
    mb = float(getattr(data_cfg, "vocab_check_mb", 64.0))
    vf, seed = float(data_cfg.valid_fraction), int(data_cfg.seed)
    domains: dict[str, DomainData] = {}
    for g in groups:
        sources = [open_source(p) for p in g.paths]
        train_parts: list[DocumentPart] = []
        valid_parts: list[DocumentPart] = []
        valid_sources: list[Source] = []
        valid_from: list[str] = []
        held_out = 0
        vg = valid_groups.get(g.name)
        for j, s in enumerate(sources):
            if vg is not None:
                train_parts += s.train
            elif s.valid is not None:
                train_parts += s.train
                valid_parts += s.valid
                valid_from.append(f"{s.path}: own validation split")
            else:
                for k, part in enumerate(s.train):
                    n = len(part.doc_offsets) - 1
                    mask = holdout_mask(n, vf, seed, f"{g.name}/{j}:{Path(s.path).name}/{k}")
                    train_parts.append(DocumentPart(part.tokens, part.doc_offsets, np.flatnonzero(~mask)))
                    valid_parts.append(DocumentPart(part.tokens, part.doc_offsets, np.flatnonzero(mask)))
                    held_out += int(mask.sum())
                valid_from.append(f"{s.path}: held out")
        if vg is not None:
            valid_sources = [open_source(p) for p in vg.paths]
            for s in valid_sources:
                valid_parts += s.train
            valid_from = [f"data.valid_paths: {', '.join(vg.paths)}"]
        budget = None if mb < 0 else int(mb * 2 ** 20)
        hi, how = _scan(sources, budget, vocab, meta.get("tokenizer"))
        vhi, vhow = _scan(valid_sources, budget, vocab, meta.get("tokenizer")) if valid_sources else (hi, how)
        tr_docs, tr_tok = _count(train_parts)
        va_docs, va_tok = _count(valid_parts)
        if tr_tok == 0:
            raise DataError(f"data.paths: domain {g.name!r} ({', '.join(g.paths)}) has no training tokens")
        record = {"source": ", ".join(g.paths), "kinds": sorted({s.kind for s in sources}),
                  "dtypes": sorted({s.dtype for s in sources}), "weight": g.weight,
                  "train_docs": tr_docs, "train_tokens": tr_tok, "valid_docs": va_docs, "valid_tokens": va_tok,
                  "valid_from": valid_from, "train_max_token_id": hi, "train_id_scan": how,
                  "valid_max_token_id": vhi, "valid_id_scan": vhow}
        if held_out:
            record["holdout"] = {"method": "seeded hash of the document index", "seed": seed,
                                 "valid_fraction": vf, "documents": held_out}
        views = {"train": train_parts, "valid": valid_parts}
        domains[g.name] = DomainData(record, lambda split, v=views: DocumentView(v[split]), weight=g.weight)
    store = TokenStore.from_domains(domains, {**meta, "backing": "in place",
                                              "blend": {g.name: g.weight for g in groups}})
    if model_vocab_size is not None:
        store.check_vocab(model_vocab_size)
    return store


def open_store(data_cfg, *, model_vocab_size: int | None = None) -> TokenStore:
    """The store a ``data`` config section describes: the in-place sources of ``data.paths`` when set, else
    the megamix store ``<data.data_dir>/tokens``. Missing or unusable data is a :class:`DataError`; with
    ``model_vocab_size`` the store is also checked against the model's vocabulary."""
    if getattr(data_cfg, "paths", None):
        return open_inplace_store(data_cfg, model_vocab_size=model_vocab_size)
    tokens = Path(data_cfg.data_dir) / "tokens"
    try:
        store = TokenStore(tokens)
    except FileNotFoundError as e:
        raise DataError(f"data.data_dir: {e}; or point data.paths at existing Megatron .bin/.idx prefixes "
                        "or a tokenised Arrow dataset") from None
    if model_vocab_size is not None:
        store.check_vocab(model_vocab_size)
    return store

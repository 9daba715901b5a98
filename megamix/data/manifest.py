"""The token store's manifests, safe under concurrent builds.

Each domain's record is written, atomically, by the process that builds that domain, into its own file
``tokens/<domain>/manifest.json``: tokenizer, vocabulary size, EOS id, dtype, and per split the
documents, tokens and largest token id of ``tokens/<domain>/<split>.{bin,idx}``. No process ever
rewrites another domain's record, so concurrent ``megamix data build/tokenize/import`` runs on different
domains cannot lose an update. The top-level ``tokens/manifest.json`` is a *derived view* of the per-domain
records (for older readers and tools); it is regenerated under a file lock after every domain write, but
readers never trust it over the per-domain files: :func:`load_manifest` merges the per-domain records with
the entries of a pre-existing (v0.1) ``manifest.json`` that have no per-domain file, and
:func:`verify_entry` checks every record against the ``.bin/.idx`` headers and sizes it describes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megamix.data.corpus import file_lock
from megamix.data.errors import DataError
from megamix.io import atomic_write_json

MANIFEST = "manifest.json"          # tokens/manifest.json (view) and tokens/<domain>/manifest.json (record)
LOCK = ".manifest.lock"
FORMAT = 2
SPLITS = ("train", "valid")
META_KEYS = ("tokenizer", "vocab_size", "eos_id", "eos_token", "dtype")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it and re-run `megamix data tokenize`") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object; delete it and re-run `megamix data tokenize`")
    return data


def _with_meta_defaults(entry: dict) -> dict:
    """Fill ``dtype`` (and ``eos_token``) for records written before they were recorded."""
    from megamix.data.token_store import best_dtype

    out = dict(entry)
    if "dtype" not in out and out.get("vocab_size"):
        out["dtype"] = np.dtype(best_dtype(int(out["vocab_size"]))).name
    return out


def domain_record_path(tokens_dir: Path, domain: str) -> Path:
    return Path(tokens_dir) / domain / MANIFEST


def load_records(tokens_dir: str | Path) -> dict[str, dict]:
    """Every domain's record: ``tokens/<domain>/manifest.json`` files, plus the entries of a v0.1
    ``tokens/manifest.json`` that have no per-domain file (they inherit its top-level tokenizer fields).
    No consistency check (see :func:`load_manifest`)."""
    root = Path(tokens_dir)
    view_path = root / MANIFEST
    domains: dict[str, dict] = {}
    if view_path.is_file():
        view = _read_json(view_path)
        top = {k: view[k] for k in META_KEYS if k in view}
        for name, e in (view.get("domains") or {}).items():
            if isinstance(e, dict) and not e.get("record"):      # a v0.1 entry: no per-domain file
                domains[name] = _with_meta_defaults({**top, **e})
    if root.is_dir():
        for f in sorted(root.glob(f"*/{MANIFEST}")):
            rec = _read_json(f)
            name = f.parent.name
            if rec.get("domain", name) != name:
                raise DataError(f"{f} describes domain {rec.get('domain')!r}, not {name!r}; it was copied from "
                                f"another domain: re-run `megamix data tokenize --domains {name} --force`")
            domains[name] = _with_meta_defaults(rec)
    return dict(sorted(domains.items()))


def load_manifest(tokens_dir: str | Path) -> dict | None:
    """The merged manifest ``{**store meta, "format", "domains": {name: record}}``; None when the folder
    holds neither a ``manifest.json`` nor any per-domain record. Store meta (tokenizer, vocab size, EOS,
    dtype) must agree across domains, else :class:`DataError` lists which domain uses what."""
    root = Path(tokens_dir)
    domains = load_records(root)
    if not domains and not (root / MANIFEST).is_file():
        return None
    meta = store_meta(domains, root)
    return {**meta, "format": FORMAT, "domains": domains}


def store_meta(domains: dict[str, dict], where: Path | str) -> dict:
    """The tokenizer/vocab/EOS/dtype shared by every domain record (empty dict for no domains)."""
    meta: dict = {}
    groups: dict[tuple, list[str]] = {}
    for name, e in domains.items():
        key = tuple(e.get(k) for k in ("tokenizer", "vocab_size", "eos_id"))
        groups.setdefault(key, []).append(name)
    if len(groups) > 1:
        desc = "; ".join(f"{names} use tokenizer {k[0]!r} (vocab {k[1]}, eos {k[2]})"
                         for k, names in groups.items())
        raise DataError(f"{where}: the domains were tokenized with different tokenizers: {desc}; re-tokenize "
                        "them with one tokenizer (`megamix data tokenize --tokenizer NAME --force`) or keep "
                        "them in separate data dirs")
    if domains:
        first = next(iter(domains.values()))
        meta = {k: first[k] for k in META_KEYS if k in first}
    return meta


def write_domain_record(tokens_dir: str | Path, domain: str, record: dict) -> dict:
    """Atomically write ``tokens/<domain>/manifest.json`` (only this domain's file), then refresh the
    derived ``tokens/manifest.json`` under the store's lock. Returns the record written."""
    root = Path(tokens_dir)
    rec = {"format": FORMAT, "domain": domain, **record}
    atomic_write_json(domain_record_path(root, domain), rec)
    refresh_view(root)
    return rec


def refresh_view(tokens_dir: str | Path) -> None:
    """Regenerate ``tokens/manifest.json`` from the per-domain records (and v0.1 entries), under the lock.
    Every writer writes its own record *before* taking the lock, so the last one to refresh sees them all."""
    root = Path(tokens_dir)
    with file_lock(root / LOCK):
        man = load_manifest(root)
        if man is None:
            return
        view = dict(man)
        view["domains"] = {name: ({**e, "record": f"{name}/{MANIFEST}"}
                                  if domain_record_path(root, name).is_file() else e)
                           for name, e in man["domains"].items()}
        atomic_write_json(root / MANIFEST, view)


def verify_entry(tokens_dir: str | Path, domain: str, entry: dict) -> None:
    """Check that a domain record matches its files: each split's ``.idx`` header (document count, dtype)
    and ``.bin`` size (tokens). Cheap (two ``stat`` calls and a 34-byte read per split); the full index
    is validated when the split is opened. Raises :class:`DataError` naming the files and the fix."""
    from megamix.data.token_store import read_index_header

    root = Path(tokens_dir)
    record = domain_record_path(root, domain)
    src = record if record.is_file() else root / MANIFEST
    fix = f"rebuild the domain: `megamix data tokenize --domains {domain} --force` (or re-import it)"
    for split in SPLITS:
        prefix = root / domain / split
        bin_p, idx_p = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
        for f in (idx_p, bin_p):
            if not f.is_file():
                raise DataError(f"{f} is missing but {src} lists domain {domain!r}; {fix}")
        want_docs, want_tokens = entry.get(f"{split}_docs"), entry.get(f"{split}_tokens")
        if want_docs is None or want_tokens is None:
            raise DataError(f"{src}: domain {domain!r} lacks {split}_docs/{split}_tokens; {fix}")
        dtype, _, doc_entries = read_index_header(prefix)
        itemsize = np.dtype(dtype).itemsize
        docs, size = doc_entries - 1, bin_p.stat().st_size
        if docs != int(want_docs) or size != int(want_tokens) * itemsize:
            raise DataError(f"{prefix}.bin/.idx hold {docs} documents / {size // itemsize} tokens but {src} "
                            f"records {want_docs} / {want_tokens}: the manifest is stale (an interrupted or "
                            f"concurrent build); {fix}")
        if entry.get("dtype") and np.dtype(entry["dtype"]) != np.dtype(dtype):
            raise DataError(f"{prefix}.idx stores {np.dtype(dtype).name} tokens but {src} records "
                            f"{entry['dtype']}; {fix}")

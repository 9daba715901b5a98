"""Build the multi-domain text corpus: ``corpus/<domain>/{train,valid}.jsonl`` + ``corpus/stats.json``.

Per domain: read documents from its :class:`~megamix.data.sources.Source` in a seeded order,
normalise them, drop exact duplicates (hash of whitespace-collapsed text), stop at the byte cap,
split train/valid with a seeded hash, and record provenance. A domain whose inputs and settings
have not changed is reused as is, so a second build is fast.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import random
import sys
import time
import unicodedata
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from megamix.data.errors import DataError, check_domain_name
from megamix.data.fetch import AptFetcher, MissingPackageError, local_package_version
from megamix.data.sources import Source, SourceContext, get_sources
from megamix.io import atomic_write_json, atomic_write_lines, iter_json_lines

CORPUS_FORMAT = 2
SPLITS = ("train", "valid")


class EmptyDomainError(RuntimeError):
    """A domain produced no usable documents."""


# ----------------------------------------------------------------------------- text helpers
def normalize_text(text: str) -> str:
    """NFC, ``\\n`` line ends, no trailing spaces, no NULs, stripped."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def dedup_key(text: str) -> str:
    """Hash used for exact de-duplication: whitespace runs collapsed, case kept."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def split_score(key: str, seed: int) -> float:
    """Seeded uniform score in [0, 1) of a document, from its dedup hash."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64


def assign_splits(keys: list[str], seed: int, valid_fraction: float,
                  sizes: list[int] | None = None) -> list[bool]:
    """Seeded train/valid split; ``True`` = validation.

    Documents are ranked by :func:`split_score` (a function of seed and text only) and the lowest
    ranked go to validation until they hold ``valid_fraction`` of the total ``sizes`` (bytes or
    tokens; document count when ``sizes`` is None). With >= 2 documents each split gets at least one.
    """
    n = len(keys)
    if n == 0:
        return []
    sizes = [1] * n if sizes is None else [max(int(x), 0) for x in sizes]
    target = valid_fraction * sum(sizes)
    order = sorted(range(n), key=lambda i: (split_score(keys[i], seed), keys[i]))
    is_valid = [False] * n
    got = 0.0
    for i in order[: n - 1]:  # always leave one training document
        if got >= target and any(is_valid):
            break
        is_valid[i] = True
        got += sizes[i]
    return is_valid


def _truncate(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars]


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (``flock`` on ``path``, created if needed) held for the block; blocks
    until free. Wrap every read-modify-write of a JSON file that concurrent builders share."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_stats(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "corpus" / "stats.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"format": CORPUS_FORMAT, "domains": {}}


def update_stats(data_dir: str | Path, domain_entries: dict[str, dict]) -> dict:
    """Merge per-domain entries into ``corpus/stats.json`` (other domains are kept). The read-modify-write
    holds ``corpus/.stats.lock``, so concurrent builds/imports of different domains never lose an entry."""
    with file_lock(Path(data_dir) / "corpus" / ".stats.lock"):
        stats = read_stats(data_dir)
        stats.setdefault("domains", {}).update(domain_entries)
        stats["domains"] = dict(sorted(stats["domains"].items()))
        atomic_write_json(Path(data_dir) / "corpus" / "stats.json", stats)
    return stats


# ----------------------------------------------------------------------------- one domain
def write_domain(data_dir: str | Path, domain: str, docs: Iterable[tuple[str, str]], *,
                 cap_bytes: int | None, valid_fraction: float, seed: int,
                 max_docs: int | None = None, max_doc_chars: int | None = None,
                 min_chars: int = 16, provenance: dict | None = None,
                 progress: bool = True, valid_docs: Iterable[tuple[str, str]] | None = None) -> dict:
    """Normalise, de-duplicate, cap and split ``docs`` into ``corpus/<domain>/{train,valid}.jsonl``.

    Args:
        docs: ``(text, source)`` pairs, already in the order to take them.
        cap_bytes: stop before the UTF-8 size of kept text would exceed this (None = no cap).
        valid_fraction: expected fraction of documents held out (at least one if there are >= 2 docs).
        max_docs: keep at most this many documents.
        max_doc_chars: cut longer documents at a line boundary.
        valid_docs: the source's own validation documents (e.g. a DatasetDict's ``validation`` split).
            When given they are the validation split (normalised and de-duplicated, not capped; a training
            document equal to one of them is dropped as a duplicate) and ``docs`` are all training.

    Returns the stats entry of the domain (docs/bytes per split, dedup counts, provenance).
    Raises :class:`EmptyDomainError` if nothing usable remains.
    """
    check_domain_name(domain)
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    filt = _DocFilter(max_doc_chars, min_chars)
    bar = tqdm(total=cap_bytes, unit="B", unit_scale=True, desc=f"corpus {domain}", file=sys.stderr,
               disable=not progress, leave=False, mininterval=1.0)
    fixed_valid: list[tuple[str, str, str]] = []  # (key, text, source)
    for text, src in valid_docs or ():
        if (c := filt.clean(text)) is None:
            continue
        key, text = c
        filt.seen.add(key)
        fixed_valid.append((key, text, src))
    kept = _take_docs(docs, filt, cap_bytes=cap_bytes, max_docs=max_docs, bar=bar)
    bar.close()
    if not kept:
        raise EmptyDomainError(f"domain {domain!r} produced no documents "
                               f"({filt.short} too short, {filt.dup} duplicates); check its source")
    if valid_docs is not None:
        if not fixed_valid:
            raise EmptyDomainError(f"domain {domain!r}: the validation split has no usable documents")
        is_valid = [False] * len(kept) + [True] * len(fixed_valid)
        kept = kept + fixed_valid
    else:
        is_valid = assign_splits([k for k, _, _ in kept], seed, valid_fraction,
                                 [len(t.encode('utf-8')) for _, t, _ in kept])
    entry = _write_splits(Path(data_dir) / "corpus" / domain, kept, is_valid)
    entry["duplicates_dropped"] = filt.dup
    entry["short_dropped"] = filt.short
    entry["cap_bytes"] = cap_bytes
    entry["provenance"] = provenance or {}
    return entry


class _DocFilter:
    """Normalises documents for :func:`write_domain` and drops (counting them) the too short and the duplicates
    of a document already kept (``seen``: the dedup keys of the kept documents)."""

    def __init__(self, max_doc_chars: int | None, min_chars: int):
        self.max_doc_chars = max_doc_chars
        self.min_chars = min_chars
        self.seen: set[str] = set()
        self.short = 0
        self.dup = 0

    def clean(self, text: str) -> tuple[str, str] | None:
        """``(dedup key, normalised text)``, or None after counting why it is dropped (too short, duplicate)."""
        text = normalize_text(_truncate(text, self.max_doc_chars))
        if len(text) < self.min_chars:
            self.short += 1
            return None
        key = dedup_key(text)
        if key in self.seen:
            self.dup += 1
            return None
        return key, text


def _take_docs(docs: Iterable[tuple[str, str]], filt: _DocFilter, *, cap_bytes: int | None, max_docs: int | None,
               bar) -> list[tuple[str, str, str]]:
    """``(key, text, source)`` of the training documents kept from ``docs``, in order, until the byte cap or
    ``max_docs``: a document that would pass the cap is skipped, and the walk stops once less than 256 bytes
    are left or 200 documents were skipped."""
    kept: list[tuple[str, str, str]] = []
    total = skipped_cap = 0
    for text, src in docs:
        if (c := filt.clean(text)) is None:
            continue
        key, text = c
        size = len(text.encode("utf-8"))
        if cap_bytes is not None and total + size > cap_bytes:
            skipped_cap += 1
            if cap_bytes - total < 256 or skipped_cap >= 200:
                break
            continue
        filt.seen.add(key)
        kept.append((key, text, src))
        total += size
        bar.update(size)
        if max_docs is not None and len(kept) >= max_docs:
            break
    return kept


def _write_splits(root: Path, kept: list[tuple[str, str, str]], is_valid: list[bool]) -> dict:
    """Write ``root/{train,valid}.jsonl`` (atomically) and return their docs/bytes counts."""
    entry: dict = {}
    for split, want in (("train", False), ("valid", True)):
        rows = [(t, s) for (_, t, s), v in zip(kept, is_valid) if v == want]
        atomic_write_lines(root / f"{split}.jsonl",
                           (json.dumps({"text": t, "source": s}, ensure_ascii=False) for t, s in rows))
        entry[split] = {"docs": len(rows), "bytes": sum(len(t.encode("utf-8")) for t, _ in rows)}
    return entry


# ----------------------------------------------------------------------------- the builder
def _provenance(src: Source, fetched: dict) -> dict:
    if src.apt_packages:
        pkgs = [{"package": p, "version": fetched[p].version, "deb": fetched[p].deb,
                 "root": str(fetched[p].root)} for p in src.apt_packages]
        lic = [str(fetched[p].root / lf) for p in src.apt_packages for lf in src.license_files
               if (fetched[p].root / lf).exists()]
    else:
        pkgs = [{"package": p, "version": local_package_version(p)} for p in src.local_packages]
        if "package" in src.extra:
            pkgs.append({"package": src.extra["package"], "version": src.extra.get("version")})
        lic = list(src.license_files)
    return {"description": src.description, "packages": pkgs, "source_paths": list(src.source_paths),
            "license": src.license, "license_files": lic}


def _settings_key(src: Source, fetched: dict, cap_bytes, valid_fraction, seed, max_docs,
                  max_doc_chars) -> str:
    versions = {p: fetched[p].version for p in src.apt_packages}
    blob = json.dumps({"format": CORPUS_FORMAT, "domain": src.name, "rev": src.revision, "cap": cap_bytes,
                       "vf": valid_fraction, "seed": seed, "max_docs": max_docs,
                       "max_doc_chars": max_doc_chars, "versions": versions}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def build_corpus(data_dir: str | Path, domains: list[str] | tuple[str, ...] | None = None, *,
                 cap_mb: float = 2.0, valid_fraction: float = 0.05, seed: int = 1234,
                 fetcher: AptFetcher | None = None, skip_missing: bool = False,
                 max_docs: int | None = None, max_doc_chars: int | None = 200_000,
                 force: bool = False, progress: bool = True) -> dict:
    """Build (or reuse) the corpus of ``domains`` under ``data_dir``.

    Args:
        domains: domain names from :data:`megamix.data.sources.SOURCES` (None = the default set).
        cap_mb: per-domain cap on kept UTF-8 text, in MB (10^6 bytes).
        fetcher: fetches the Debian packages; None means only domains without packages work.
        skip_missing: drop domains whose packages cannot be fetched (with a warning) instead of failing.
        max_docs, max_doc_chars: optional per-domain document count / per-document length limits.
        force: rebuild even if the cached domain matches.

    Returns the updated ``stats.json`` content. Raises :class:`MissingPackageError` naming every
    missing package and the domains it affects.
    """
    if cap_mb <= 0:
        raise ValueError(f"cap_mb must be > 0, got {cap_mb}")
    data_dir = Path(data_dir)
    sources = get_sources(list(domains) if domains else None)
    need: dict[str, list[str]] = {}
    for s in sources:
        for p in s.apt_packages:
            need.setdefault(p, []).append(s.name)
    fetched, failed = {}, {}
    for s in sources:  # Python-side readers (rdata, pysword) are checked up front too
        spec = s.extra.get("pip")
        if spec and importlib.util.find_spec(spec.split("==")[0]) is None:
            key = f"pip:{spec}"
            need.setdefault(key, []).append(s.name)
            failed[key] = f"Python package not installed: pip install torch==2.13.0 {spec}"
    if need:
        if fetcher is None:
            failed.update({p: "no package fetcher given (library call without network access)"
                           for p in need if not p.startswith("pip:")})
        else:
            got, bad = fetcher.fetch_all({p: d for p, d in need.items() if not p.startswith("pip:")})
            fetched.update(got)
            failed.update(bad)
    if failed:
        err = MissingPackageError(failed, {p: need[p] for p in failed})
        if not skip_missing:
            raise err
        dropped = sorted({d for p in failed for d in need[p]})
        warnings.warn(f"SKIPPING domain(s) {dropped}: {err}", stacklevel=2)
        print(f"WARNING: skipping domain(s) {', '.join(dropped)} because packages are missing:\n{err}",
              file=sys.stderr)
        sources = [s for s in sources if s.name not in dropped]
        if not sources:
            raise err
    cap_bytes = int(cap_mb * 1e6)
    entries = {}
    old = read_stats(data_dir).get("domains", {})
    for src in tqdm(sources, desc="domains", file=sys.stderr, disable=not progress):
        key = _settings_key(src, fetched, cap_bytes, valid_fraction, seed, max_docs, max_doc_chars)
        root = data_dir / "corpus" / src.name
        if (not force and old.get(src.name, {}).get("build_key") == key
                and all((root / f"{sp}.jsonl").is_file() for sp in SPLITS)):
            entries[src.name] = old[src.name]
            continue
        t0 = time.perf_counter()
        ctx = SourceContext(roots={p: fetched[p].root for p in src.apt_packages},
                            rng=random.Random(f"{seed}:{src.name}"))
        entry = write_domain(data_dir, src.name, src.reader(ctx), cap_bytes=cap_bytes,
                             valid_fraction=valid_fraction, seed=seed, max_docs=max_docs,
                             max_doc_chars=max_doc_chars, provenance=_provenance(src, fetched),
                             progress=progress)
        entry["build_key"] = key
        entry["build_seconds"] = round(time.perf_counter() - t0, 2)
        entries[src.name] = entry
        update_stats(data_dir, {src.name: entry})
    return update_stats(data_dir, entries)


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a corpus jsonl file (``{"text", "source"}`` objects); blank lines are skipped and a
    malformed line is a :class:`DataError` naming ``path:line`` (reading: :func:`megamix.io.iter_json_lines`)."""
    for lineno, row in iter_json_lines(path, error=DataError):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field; fix or remove "
                            "that line")
        yield row


def corpus_domains(data_dir: str | Path, split: str = "train", *, required: bool = False) -> list[str]:
    """The domains of the corpus under ``data_dir``: sorted names of the folders ``corpus/<domain>/`` that hold a
    ``<split>.jsonl`` file. The one listing of a corpus's domains (tokenizing, regrouping and Domain2Vec use it).

    Only regular files count (a folder named ``train.jsonl`` is not a split) and names starting with ``.`` are
    skipped (no domain may start with one: :func:`~megamix.data.errors.check_domain_name`; such folders are
    scratch space). No ``corpus/`` folder, or none with the split: ``[]``, or with ``required=True`` a
    ``FileNotFoundError`` saying to build the corpus."""
    root = Path(data_dir) / "corpus"
    if not root.is_dir():
        if required:
            raise FileNotFoundError(f"{root} does not exist: build the corpus first (`megamix data build`)")
        return []
    doms = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / f"{split}.jsonl").is_file())
    if required and not doms:
        raise FileNotFoundError(f"no {root}/<domain>/{split}.jsonl files found")
    return doms

"""Known-answer data for the evaluation: token stores derived from a built one, with a known right answer.

Each builder writes a new data dir under ``<base>/scenarios/<name>/`` (``tokens/`` only: a store, not a corpus)
whose unchanged domain splits are hard links to the base store's ``.bin/.idx`` files (copies across file
systems), and records in ``scenario.json`` what it was built from (the base's per-domain records) and with which
parameters. A view whose record matches is reused as it is; a stale one (the base store was re-tokenized, other
parameters) is rebuilt. A view is built under a temporary name and renamed into place, under a lock, so
concurrent suites never see half of one. Everything generated is a function of the base store and ``seed``.

- :func:`build_junk_store`: the base domains plus ``junk``, documents of uniformly random token ids (never the
  EOS, which ends every document as in any domain), with the document lengths of the base domain of median
  size (train and valid). It cannot be learned: its best loss is ``ln(V - 1)``.
- :func:`build_repeat_store`: one domain's train split replaced by a single of its documents (chosen by
  ``seed`` among those of typical length) repeated until the split holds at least as many tokens as before;
  its valid split, and every other domain, are the base's.
- :func:`build_target_stores`: train on every domain but ``target`` and evaluate on ``target`` only: a
  training view without the target whose every *valid* split is the target's **train** split (which nothing
  trains on), so held-out gradients (``mixing.eval_grad_batches``) are the target's, on documents other than
  those the loss is reported on; and an evaluation store holding the target alone (``data.eval_data_dir``),
  whose valid split is the target's own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from megamix.data.corpus import file_lock
from megamix.data.errors import DataError
from megamix.data.manifest import load_manifest, write_domain_record
from megamix.data.token_store import IndexedTokenDataset, IndexedTokenWriter
from megamix.io import atomic_write_json, tmp_path

SCENARIO_DIR = "scenarios"
RECORD = "scenario.json"
JUNK = "junk"
SPLITS = ("train", "valid")
_KEEP = ("tokenizer", "vocab_size", "eos_id", "eos_token", "dtype")
_VERSION = 1

__all__ = ["build_junk_store", "build_repeat_store", "build_target_stores", "scenario_dir", "JUNK",
           "median_domain", "pick_repeat_document"]


def scenario_dir(base: str | Path, name: str) -> Path:
    return Path(base) / SCENARIO_DIR / name


def _base_manifest(base: Path) -> dict:
    man = load_manifest(base / "tokens")
    if not man or not man.get("domains"):
        raise DataError(f"{base / 'tokens'} holds no token store; build it first (`megamix data build`, or "
                        "`megamix data tokenizer` for a new tokenizer)")
    return man


def _fingerprint(man: dict) -> dict:
    """What a view depends on: per domain and split, documents, tokens and the corpus sha256."""
    return {d: {k: r.get(k) for k in ("train_docs", "train_tokens", "valid_docs", "valid_tokens", "corpus_sha256",
                                       "tokenizer", "vocab_size")} for d, r in man["domains"].items()}


def _rng(seed: int, *key: str) -> np.random.Generator:
    salt = int.from_bytes(hashlib.sha256(":".join(key).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), salt])


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _link_split(base_tokens: Path, src_dom: str, src_split: str, tokens: Path, dom: str, split: str) -> None:
    for ext in (".bin", ".idx"):
        _link(base_tokens / src_dom / f"{src_split}{ext}", tokens / dom / f"{split}{ext}")


def _split_fields(rec: dict, split: str, as_split: str) -> dict:
    return {f"{as_split}_{k}": rec.get(f"{split}_{k}") for k in ("docs", "tokens", "max_token_id")}


def _dataset(base: Path, domain: str, split: str) -> IndexedTokenDataset:
    return IndexedTokenDataset(base / "tokens" / domain / split)


def _build_view(base: Path, name: str, params: dict, fill) -> Path:
    """The view ``<base>/scenarios/<name>``: reused when its record matches, else built by ``fill(tokens_dir,
    manifest) -> extra record fields`` under a temporary name and renamed into place."""
    base = Path(base)
    man = _base_manifest(base)
    want = {"version": _VERSION, "scenario": name, "params": params, "base": str(base.resolve()),
            "base_records": _fingerprint(man)}
    out = scenario_dir(base, name)
    with file_lock(base / SCENARIO_DIR / f".{name}.lock"):
        rec = out / RECORD
        if rec.is_file():
            old = json.loads(rec.read_text())
            if {k: old.get(k) for k in want} == want:
                return out
        elif out.exists():
            raise DataError(f"{out} exists but is not a scenario view (no {RECORD}); move it away and rerun")
        tmp = tmp_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        extra = fill(tmp / "tokens", man)
        atomic_write_json(tmp / RECORD, {**want, **extra})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return out


def _meta(man: dict) -> dict:
    return {k: man[k] for k in _KEEP if k in man}


def median_domain(man: dict) -> str:
    """The domain whose train token count is the (lower) median of the store's."""
    doms = sorted(man["domains"], key=lambda d: (man["domains"][d]["train_tokens"], d))
    return doms[(len(doms) - 1) // 2]


def _write_random_docs(prefix: Path, lengths: np.ndarray, vocab: int, eos: int, dtype, rng) -> dict:
    """Documents of the given lengths: ``length - 1`` ids uniform over the vocabulary without ``eos``, then
    ``eos``."""
    with IndexedTokenWriter(prefix, dtype) as w:
        for n in lengths.tolist():
            ids = rng.integers(0, vocab - 1, size=max(int(n) - 1, 0), dtype=np.int64)
            ids[ids >= eos] += 1                              # skip the EOS id
            w.add_document(np.append(ids, eos))
    return {"docs": int(len(lengths)), "tokens": int(lengths.sum()), "max_token_id": int(w.max_token_id)}


def build_junk_store(base: str | Path, *, seed: int = 0) -> Path:
    """``<base>/scenarios/junk``: every base domain plus ``junk`` (uniformly random ids, see the module
    docstring). Returns the data dir."""
    base = Path(base)

    def fill(tokens: Path, man: dict) -> dict:
        if JUNK in man["domains"]:
            raise DataError(f"{base / 'tokens'} already has a domain named {JUNK!r}; rename it to build the junk "
                            "scenario")
        meta = _meta(man)
        for d, r in man["domains"].items():
            for split in SPLITS:
                _link_split(base / "tokens", d, split, tokens, d, split)
            write_domain_record(tokens, d, {k: v for k, v in r.items() if k not in ("format", "domain", "record")})
        shape = median_domain(man)
        vocab, eos = int(man["vocab_size"]), int(man["eos_id"])
        rng = _rng(seed, "junk")
        entry = {"source": {"kind": "uniform random ids", "seed": seed, "lengths_from": shape}, **meta}
        for split in SPLITS:
            lengths = np.asarray(_dataset(base, shape, split).doc_lengths, np.int64)
            got = _write_random_docs(tokens / JUNK / split, lengths, vocab, eos, np.dtype(meta["dtype"]).type, rng)
            entry.update({f"{split}_{k}": v for k, v in got.items()})
        write_domain_record(tokens, JUNK, entry)
        return {"junk": {"lengths_from": shape, "floor_nats": float(np.log(vocab - 1))}}

    return _build_view(base, "junk", {"seed": int(seed)}, fill)


def pick_repeat_document(lengths: np.ndarray, seed: int, domain: str, min_tokens: int = 256) -> int:
    """A document of typical length (between half and twice the median, at least ``min_tokens``) chosen by
    ``seed``; the longest document when none qualifies."""
    lengths = np.asarray(lengths, np.int64)
    med = float(np.median(lengths))
    ok = np.flatnonzero((lengths >= max(min_tokens, med / 2)) & (lengths <= max(2 * med, min_tokens)))
    if not len(ok):
        return int(np.argmax(lengths))
    return int(_rng(seed, "repeat", domain).choice(ok))


def build_repeat_store(base: str | Path, domain: str, *, seed: int = 0) -> Path:
    """``<base>/scenarios/repeat-<domain>``: ``domain``'s train split is one of its documents repeated (see the
    module docstring). Returns the data dir."""
    base = Path(base)

    def fill(tokens: Path, man: dict) -> dict:
        if domain not in man["domains"]:
            raise DataError(f"--repeat-domain {domain!r} is not in {base / 'tokens'} (it has "
                            f"{sorted(man['domains'])})")
        for d, r in man["domains"].items():
            for split in SPLITS:
                if not (d == domain and split == "train"):
                    _link_split(base / "tokens", d, split, tokens, d, split)
            if d != domain:
                write_domain_record(tokens, d, {k: v for k, v in r.items() if k not in ("format", "domain", "record")})
        ds = _dataset(base, domain, "train")
        i = pick_repeat_document(ds.doc_lengths, seed, domain)
        doc = np.asarray(ds[i])
        target = int(man["domains"][domain]["train_tokens"])
        copies = -(-target // len(doc))
        with IndexedTokenWriter(tokens / domain / "train", np.dtype(man["dtype"]).type) as w:
            for _ in range(copies):
                w.add_document(doc)
        rec = {k: v for k, v in man["domains"][domain].items() if k not in ("format", "domain", "record")}
        rec.update(train_docs=copies, train_tokens=copies * len(doc), train_max_token_id=int(doc.max()))
        rec["source"] = {"kind": "one document repeated", "document": i, "document_tokens": int(len(doc)),
                         "copies": copies, "seed": seed,
                         "document_sha256": hashlib.sha256(doc.astype(np.int64).tobytes()).hexdigest()}
        write_domain_record(tokens, domain, rec)
        return {"repeat": {"domain": domain, **rec["source"]}}

    return _build_view(base, f"repeat-{domain}", {"domain": domain, "seed": int(seed)}, fill)


def build_target_stores(base: str | Path, target: str) -> tuple[Path, Path]:
    """``(train view, eval store)`` of the target scenario (see the module docstring)."""
    base = Path(base)

    def fill_train(tokens: Path, man: dict) -> dict:
        _check_target(man)
        trec = man["domains"][target]
        for d, r in man["domains"].items():
            if d == target:
                continue
            _link_split(base / "tokens", d, "train", tokens, d, "train")
            _link_split(base / "tokens", target, "train", tokens, d, "valid")
            rec = {k: v for k, v in r.items() if k not in ("format", "domain", "record", "corpus_sha256")}
            rec.update(_split_fields(trec, "train", "valid"))
            rec["valid_is"] = f"{target}/train"
            write_domain_record(tokens, d, rec)
        return {"target": {"domain": target, "held_out_gradients_from": f"{target}/train",
                           "trained_domains": sorted(d for d in man["domains"] if d != target)}}

    def fill_eval(tokens: Path, man: dict) -> dict:
        _check_target(man)
        for split in SPLITS:
            _link_split(base / "tokens", target, split, tokens, target, split)
        r = man["domains"][target]
        write_domain_record(tokens, target, {k: v for k, v in r.items() if k not in ("format", "domain", "record")})
        return {"target": {"domain": target, "evaluated_on": f"{target}/valid"}}

    def _check_target(man: dict) -> None:
        if target not in man["domains"]:
            raise DataError(f"--target {target!r} is not in {base / 'tokens'} (it has {sorted(man['domains'])})")
        if len(man["domains"]) < 2:
            raise DataError("the target scenario needs at least 2 domains (one target, one to train on)")

    train = _build_view(base, f"target-{target}", {"target": target}, fill_train)
    ev = _build_view(base, f"target-{target}-eval", {"target": target}, fill_eval)
    return train, ev

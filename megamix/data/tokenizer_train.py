"""A small corpus tokenizer: a byte-level BPE trained on a data dir's train split, and a store tokenized with it.

:func:`train_bpe_tokenizer` trains a byte-level BPE (``tokenizers``: the 256 byte symbols, then merges) of a
given vocabulary size on ``corpus/<domain>/train.jsonl`` of the domains given (never the validation split) and
saves it as a Hugging Face tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``; a ``data.tokenizer``
value). Its one special token ``<|endoftext|>`` (id 0) is the EOS a store appends after each document. A record,
``megamix_tokenizer.json``, names what it was trained on (vocabulary, domains, the sha256 of every train file,
the ``tokenizers`` version); a folder whose record matches is reused, and one that does not is refused unless
``force`` (nothing is overwritten unasked). The folder appears atomically (written under a temporary name, then
renamed).

:func:`build_tokenized_store` makes a new data dir ``out`` from a built one: ``out/tokenizer`` (trained as above,
or an existing tokenizer folder), ``out/corpus`` (the source's jsonl files, hard-linked, else copied; its own
``stats.json``) and ``out/tokens`` written by :func:`megamix.data.tokenize.tokenize_corpus`, which skips
splits whose text and tokenizer are unchanged, so running it again is cheap.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from megamix.data.corpus import SPLITS, corpus_domains, iter_jsonl, read_stats, update_stats
from megamix.data.errors import DataError
from megamix.data.tokenize import file_sha256, tokenize_corpus
from megamix.io import atomic_path, atomic_write_json, tmp_path

EOS_TOKEN = "<|endoftext|>"
RECORD = "megamix_tokenizer.json"
MIN_VOCAB = 512          # 256 bytes + EOS + enough merges to be a BPE at all
MAX_VOCAB = 65_500       # uint16 stores (megamix.data.token_store.best_dtype)

__all__ = ["train_bpe_tokenizer", "build_tokenized_store", "link_corpus", "EOS_TOKEN", "RECORD"]


def _train_files(data_dir: Path, domains: list[str] | None) -> dict[str, Path]:
    available = corpus_domains(data_dir, "train", required=True)
    domains = list(domains) if domains else available
    missing = [d for d in domains if d not in available]
    if missing:
        raise DataError(f"no train split for domain(s) {missing} under {data_dir / 'corpus'}; available: {available}")
    return {d: data_dir / "corpus" / d / "train.jsonl" for d in domains}


def _texts(files: dict[str, Path], progress: bool):
    bar = tqdm(total=len(files), desc="tokenizer text", unit="domain", file=sys.stderr, disable=not progress,
               leave=False)
    for f in files.values():
        for row in iter_jsonl(f):
            yield row["text"]
        bar.update(1)
    bar.close()


def _expected_record(files: dict[str, Path], vocab_size: int, min_frequency: int) -> dict:
    import tokenizers

    return {"kind": "byte-level BPE", "vocab_size": int(vocab_size), "min_frequency": int(min_frequency),
            "eos_token": EOS_TOKEN, "split": "train", "domains": sorted(files),
            "train_sha256": {d: file_sha256(p) for d, p in sorted(files.items())},
            "tokenizers_version": tokenizers.__version__}


def _same_training(old: dict, new: dict) -> bool:
    keys = ("kind", "vocab_size", "min_frequency", "eos_token", "split", "domains", "train_sha256")
    return all(old.get(k) == new.get(k) for k in keys)


def train_bpe_tokenizer(data_dir: str | Path, out_dir: str | Path, vocab_size: int, *,
                        domains: list[str] | None = None, min_frequency: int = 2, force: bool = False,
                        progress: bool = True) -> Path:
    """Train a byte-level BPE with ``vocab_size`` ids on the train split of ``data_dir``'s corpus; save it as a
    Hugging Face tokenizer folder at ``out_dir`` (returned). Reuses a folder trained the same way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not MIN_VOCAB <= int(vocab_size) <= MAX_VOCAB:
        raise DataError(f"--vocab {vocab_size}: a byte-level BPE here needs {MIN_VOCAB} to {MAX_VOCAB} ids "
                        "(256 bytes + EOS + merges; uint16 stores); e.g. --vocab 8192")
    if min_frequency < 1:
        raise DataError(f"--min-frequency must be >= 1 (got {min_frequency})")
    data_dir, out = Path(data_dir), Path(out_dir)
    files = _train_files(data_dir, domains)
    want = _expected_record(files, vocab_size, min_frequency)
    rec_path = out / RECORD
    if out.exists():
        old = json.loads(rec_path.read_text()) if rec_path.is_file() else None
        if old is not None and _same_training(old, want) and not force:
            return out
        if not force:
            why = "holds no megamix tokenizer record" if old is None else "was trained differently (" + ", ".join(
                k for k in ("vocab_size", "min_frequency", "domains", "train_sha256") if old.get(k) != want.get(k)) + ")"
            raise DataError(f"{out} already exists and {why}; pass --force to retrain it, or choose another --out")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(_texts(files, progress), trainer)
    got = tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    tmp = tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    atomic_write_json(tmp / RECORD, {**want, "trained_vocab_size": int(got), "eos_id": int(fast.eos_token_id),
                                     "source_data_dir": str(data_dir.resolve())})
    if out.exists():                 # force: the old folder goes only once the new one is complete
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy across file systems), atomically; kept if already the same."""
    if dst.is_file() and (os.path.samefile(src, dst) or file_sha256(src) == file_sha256(dst)):
        return
    with atomic_path(dst) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def link_corpus(src_dir: str | Path, out_dir: str | Path, domains: list[str]) -> None:
    """``out_dir/corpus/<domain>/{train,valid}.jsonl`` as links to ``src_dir``'s, and the domains' entries of
    its ``stats.json`` (without token counts: the new store's tokenize fills them)."""
    src, out = Path(src_dir), Path(out_dir)
    stats = read_stats(src).get("domains", {})
    entries = {}
    for d in domains:
        for split in SPLITS:
            f = src / "corpus" / d / f"{split}.jsonl"
            if f.is_file():
                _link_or_copy(f, out / "corpus" / d / f"{split}.jsonl")
        if d in stats:
            e = json.loads(json.dumps(stats[d]))
            for split in SPLITS:
                if isinstance(e.get(split), dict):
                    e[split].pop("tokens", None)
            entries[d] = e
    if entries:
        update_stats(out, entries)


def build_tokenized_store(data_dir: str | Path, out_dir: str | Path, *, vocab_size: int | None = None,
                          tokenizer: str | None = None, domains: list[str] | None = None, min_frequency: int = 2,
                          force: bool = False, progress: bool = True) -> dict:
    """A new data dir ``out_dir`` holding ``data_dir``'s corpus tokenized with a byte-level BPE of ``vocab_size``
    trained on its train split (``out_dir/tokenizer``), or with the existing ``tokenizer`` folder. Returns the
    new store's manifest."""
    src, out = Path(data_dir), Path(out_dir)
    if (vocab_size is None) == (not tokenizer):
        raise DataError("give exactly one of --vocab (train a tokenizer) and --tokenizer (use an existing one)")
    if src.resolve() == out.resolve():
        raise DataError(f"--out {out} must be a new data dir, not --data-dir itself (the source store is kept as "
                        "it is); e.g. --out data_8k")
    doms = list(domains) if domains else corpus_domains(src, "train", required=True)
    if tokenizer:
        tok_dir = Path(tokenizer)
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
            raise DataError(f"--tokenizer {tok_dir} is not a tokenizer folder (no tokenizer.json or "
                            "tokenizer_config.json); pass a folder written by `megamix data tokenizer`")
    else:
        tok_dir = train_bpe_tokenizer(src, out / "tokenizer", int(vocab_size), domains=doms,
                                      min_frequency=min_frequency, force=force, progress=progress)
    link_corpus(src, out, doms)
    return tokenize_corpus(out, doms, force=force, progress=progress, tokenizer=str(tok_dir.resolve()))

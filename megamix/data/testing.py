"""Test helpers: a small but real multi-domain token store built in seconds without network."""
from __future__ import annotations

from pathlib import Path

from megamix.data.corpus import build_corpus
from megamix.data.sources import LOCAL_DOMAINS
from megamix.data.tokenize import tokenize_corpus

TINY_DOMAINS = ("code_python", "legal", "changelogs", "manpages")


def build_tiny_store(root: str | Path, domains: tuple[str, ...] | list[str] = TINY_DOMAINS, *,
                     max_docs: int = 40, max_doc_chars: int = 4000, cap_mb: float = 0.2,
                     valid_fraction: float = 0.15, seed: int = 0, progress: bool = False) -> Path:
    """Build ``root/corpus`` and ``root/tokens`` from text already on this machine.

    Only domains that need no Debian download are allowed (:data:`LOCAL_DOMAINS`). With the
    defaults each domain holds up to 40 documents of at most 4000 characters (roughly 15-40k
    tokens per domain) and at least one validation document.

    Returns the ``tokens`` directory (open it with :class:`megamix.data.store.TokenStore`).
    """
    bad = [d for d in domains if d not in LOCAL_DOMAINS]
    if bad:
        raise ValueError(f"build_tiny_store only takes local domains {LOCAL_DOMAINS}; got {bad}")
    root = Path(root)
    build_corpus(root, list(domains), cap_mb=cap_mb, valid_fraction=valid_fraction, seed=seed,
                 fetcher=None, max_docs=max_docs, max_doc_chars=max_doc_chars, progress=progress)
    tokenize_corpus(root, list(domains), progress=progress)
    return root / "tokens"

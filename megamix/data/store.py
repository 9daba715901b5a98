"""``TokenStore``: the per-domain token store under ``<data_dir>/tokens``.

Layout::

    tokens/manifest.json                      tokenizer, vocab_size, eos_id, per-domain counts
    tokens/<domain>/{train,valid}.{bin,idx}   Megatron MMapIndexedDataset-compatible stores
"""
from __future__ import annotations

import json
from pathlib import Path

from megamix.data.token_store import IndexedTokenDataset

SPLITS = ("train", "valid")
MANIFEST = "manifest.json"


def read_manifest(tokens_dir: str | Path) -> dict:
    """Load and sanity-check ``tokens/manifest.json``."""
    path = Path(tokens_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the token store first with "
                                f"`megamix data build` or `megamix data tokenize`")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    for key in ("tokenizer", "vocab_size", "eos_id", "domains"):
        if key not in man:
            raise ValueError(f"{path} lacks the key {key!r}")
    return man


class TokenStore:
    """Read access to every domain of a token store.

    Args:
        tokens_dir: the ``tokens/`` folder (holding ``manifest.json``).
    """

    def __init__(self, tokens_dir: str | Path):
        self.root = Path(tokens_dir)
        self.manifest = read_manifest(self.root)
        self.domains: list[str] = sorted(self.manifest["domains"])
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_id: int = int(self.manifest["eos_id"])
        self._cache: dict[tuple[str, str], IndexedTokenDataset] = {}

    def _check(self, domain: str, split: str) -> None:
        if domain not in self.manifest["domains"]:
            raise KeyError(f"unknown domain {domain!r}; this store has {self.domains}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def prefix(self, domain: str, split: str) -> Path:
        """Path prefix (without .bin/.idx) of one domain split."""
        self._check(domain, split)
        return self.root / domain / split

    def dataset(self, domain: str, split: str = "train") -> IndexedTokenDataset:
        """The documents of one domain split (memory-mapped, cached)."""
        key = (domain, split)
        if key not in self._cache:
            self._cache[key] = IndexedTokenDataset(self.prefix(domain, split))
        return self._cache[key]

    def num_tokens(self, domain: str, split: str = "train") -> int:
        """Tokens (including the EOS after each document) in one domain split, from the manifest."""
        self._check(domain, split)
        return int(self.manifest["domains"][domain][f"{split}_tokens"])

    def num_docs(self, domain: str, split: str = "train") -> int:
        self._check(domain, split)
        return int(self.manifest["domains"][domain][f"{split}_docs"])

    def __repr__(self) -> str:
        return f"TokenStore({str(self.root)!r}, domains={self.domains})"

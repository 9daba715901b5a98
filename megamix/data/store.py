"""``TokenStore``: the one interface the loader and the trainer read token data through.

A store has ``domains``; each domain has a ``train`` and a ``valid`` split; a split is a *document view*
(see :mod:`megamix.data.views`): a flat, memory-mapped token stream plus document offsets. The store also
carries what the model must agree with: ``vocab_size``, ``eos_id``, ``tokenizer`` and the largest token id.
Several backings produce the same interface:

* a megamix token store folder (:class:`TokenStore` ``(tokens_dir)``)::

      tokens/<domain>/{train,valid}.{bin,idx}   Megatron MMIDIDX files written by `megamix data tokenize/import`
      tokens/<domain>/manifest.json             that domain's record (see megamix.data.manifest)
      tokens/manifest.json                      derived view of all records (v0.1 stores: the only manifest)

* existing Megatron ``.bin/.idx`` prefixes and tokenised Hugging Face Arrow datasets, used in place
  (:mod:`megamix.data.backings`, from ``data.paths``), which build a store with
  :meth:`TokenStore.from_domains`.

:func:`megamix.data.backings.open_store` picks the backing from a ``data`` config section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megamix.data.errors import DataError
from megamix.data.manifest import MANIFEST, SPLITS, load_manifest, verify_entry
from megamix.data.token_store import IndexedTokenDataset

__all__ = ["SPLITS", "MANIFEST", "read_manifest", "DomainData", "TokenStore"]


def read_manifest(tokens_dir: str | Path) -> dict:
    """The merged manifest of a megamix token store (per-domain records + v0.1 entries)."""
    path = Path(tokens_dir) / MANIFEST
    man = load_manifest(tokens_dir)
    if man is None:
        raise FileNotFoundError(f"{path} not found: build the token store first with "
                                f"`megamix data build` or `megamix data tokenize`")
    for key in ("tokenizer", "vocab_size", "eos_id", "domains"):
        if key not in man and man["domains"]:
            raise DataError(f"{path} lacks the key {key!r}; re-run `megamix data tokenize --force`")
    return man


@dataclass
class DomainData:
    """One domain of a store: its record (``{split}_tokens``, ``{split}_docs``, source details, optionally
    ``max_token_id``), how to open a split's document view, and an optional blend weight."""

    record: dict
    open_split: Callable[[str], object]
    weight: float | None = None
    views: dict = field(default_factory=dict)


class TokenStore:
    """Read access to every domain of a token store.

    Args:
        tokens_dir: a megamix ``tokens/`` folder. Other backings use :meth:`from_domains`.

    Attributes:
        domains: sorted domain names.
        manifest: ``{tokenizer, vocab_size, eos_id, dtype, ..., "domains": {name: record}}``.
        vocab_size: the tokenizer's vocabulary size, or None when unknown (in-place data without
            ``data.tokenizer``; then only the token ids are checked against the model).
        eos_id: the id appended after each document (0 when unknown; only used to pad evaluation windows).
        tokenizer: the recorded tokenizer (``"gpt2"``, a folder, a Hugging Face name) or None.
    """

    def __init__(self, tokens_dir: str | Path):
        root = Path(tokens_dir)
        man = read_manifest(root)
        domains = {}
        for name, rec in man["domains"].items():
            verify_entry(root, name, rec)
            domains[name] = DomainData(rec, self._megamix_opener(root, name))
        self._setup(domains, {k: v for k, v in man.items() if k != "domains"}, root)

    @staticmethod
    def _megamix_opener(root: Path, name: str):
        return lambda split: IndexedTokenDataset(root / name / split)

    @classmethod
    def from_domains(cls, domains: dict[str, DomainData], meta: dict, root: Path | None = None) -> "TokenStore":
        """A store over arbitrary document views (the in-place backings)."""
        store = cls.__new__(cls)
        store._setup(domains, meta, root)
        return store

    def _setup(self, domains: dict[str, DomainData], meta: dict, root: Path | None) -> None:
        self.root = root
        self._domains = dict(sorted(domains.items()))
        self.meta = dict(meta)
        self.domains: list[str] = list(self._domains)
        vs = meta.get("vocab_size")
        self.vocab_size: int | None = int(vs) if vs is not None else None
        self.eos_id: int = int(meta["eos_id"]) if meta.get("eos_id") is not None else 0
        self.tokenizer: str | None = meta.get("tokenizer")

    # ------------------------------------------------------------------ the interface
    @property
    def manifest(self) -> dict:
        return {**self.meta, "domains": {n: dict(d.record) for n, d in self._domains.items()}}

    def _check(self, domain: str, split: str) -> None:
        if domain not in self._domains:
            raise KeyError(f"unknown domain {domain!r}; this store has {self.domains}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def prefix(self, domain: str, split: str) -> Path:
        """Path prefix (without .bin/.idx) of one domain split of a megamix store folder."""
        self._check(domain, split)
        if self.root is None:
            raise ValueError("this store is not a megamix tokens/ folder; its splits have no single prefix")
        return self.root / domain / split

    def dataset(self, domain: str, split: str = "train"):
        """The documents of one domain split (memory-mapped, opened once): ``tokens``, ``doc_offsets``,
        ``doc_lengths``, ``num_tokens``, ``dtype``, ``len()``, ``[i]``."""
        self._check(domain, split)
        d = self._domains[domain]
        if split not in d.views:
            d.views[split] = d.open_split(split)
        return d.views[split]

    def num_tokens(self, domain: str, split: str = "train") -> int:
        """Tokens in one domain split (megamix stores: including the EOS after each document)."""
        self._check(domain, split)
        return int(self._domains[domain].record[f"{split}_tokens"])

    def num_docs(self, domain: str, split: str = "train") -> int:
        self._check(domain, split)
        return int(self._domains[domain].record[f"{split}_docs"])

    def blend_weights(self) -> dict[str, float] | None:
        """The normalised blend weights of ``data.paths`` (``[w1, prefix1, ...]``), or None."""
        w = {n: d.weight for n, d in self._domains.items()}
        if any(v is None for v in w.values()):
            return None
        total = sum(w.values())
        return {n: v / total for n, v in w.items()}

    def natural_sizes(self, domains: list[str] | None = None) -> list[float]:
        """What ``mixture.kind=natural`` is proportional to: the blend weights when ``data.paths`` gave
        weights (as Megatron samples a blend), else the training tokens of each domain."""
        domains = self.domains if domains is None else list(domains)
        blend = self.blend_weights()
        if blend is not None:
            return [blend[d] for d in domains]
        return [float(self.num_tokens(d, "train")) for d in domains]

    @property
    def max_token_id(self) -> int | None:
        """The largest token id recorded or scanned over all domains and splits (None if unknown)."""
        ids = []
        for d in self._domains.values():
            for split in SPLITS:
                v = d.record.get(f"{split}_max_token_id")
                if v is None:
                    return None
                ids.append(int(v))
        return max(ids) if ids else None

    def check_vocab(self, model_vocab_size: int, what: str = "model.vocab_size") -> None:
        """Raise :class:`DataError` unless a model with ``model_vocab_size`` ids can read this store: its
        vocabulary must be at least the store's, and every (recorded or scanned) token id below it."""
        where = str(self.root) if self.root is not None else "data.paths"
        if self.vocab_size is not None and self.vocab_size > model_vocab_size:
            raise DataError(f"{what}={model_vocab_size} is smaller than the vocabulary of the token data "
                            f"({self.vocab_size}, tokenizer {self.tokenizer!r}, {where}); set "
                            f"{what}={self.vocab_size} or larger")
        for name, d in self._domains.items():
            for split in SPLITS:
                hi = d.record.get(f"{split}_max_token_id")
                if hi is not None and int(hi) >= model_vocab_size:
                    src = f"{where}/{name}" if self.root is not None else d.record.get("source", "data.paths")
                    scanned = d.record.get(f"{split}_id_scan", "")
                    raise DataError(f"domain {name!r} ({split}, {src}) holds token id {hi} >= {what}="
                                    f"{model_vocab_size}{' (' + scanned + ')' if scanned else ''}; set {what} to "
                                    "the vocabulary the data was tokenized with (or data.tokenizer to that tokenizer)")

    def __repr__(self) -> str:
        return f"TokenStore({str(self.root) if self.root else 'in place'!r}, domains={self.domains})"

"""Documents of a domain split as one flat token stream, assembled from memory-mapped pieces without copying.

Every backing of the :class:`~megamix.data.store.TokenStore` hands the loader the same thing, a
*document view*: ``tokens`` (a flat, sliceable token array), ``doc_offsets`` (int64 ``[N+1]``),
``doc_lengths``, ``num_tokens``, ``dtype``, ``len()`` and ``[i]`` (one document). A megamix store split is
one ``.bin`` (:class:`~megamix.data.token_store.IndexedTokenDataset` already is such a view); a group of
Megatron prefixes, a held-out subset of documents, or the chunks of an Arrow column are
:class:`DocumentView` objects whose ``tokens`` is a :class:`ConcatTokens`: a virtual concatenation of
slices of memory-mapped arrays. Slicing it copies only the requested window.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class DocumentSequence:
    """Documents as slices of one token array; a subclass sets ``tokens``, ``doc_offsets`` ([n+1]) and
    ``doc_lengths`` ([n]). ``seq[i]`` is document i's tokens (negative i counts from the end)."""

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i %= n
        return np.asarray(self.tokens[int(self.doc_offsets[i]):int(self.doc_offsets[i + 1])])


class ConcatTokens:
    """A read-only 1-D token array made of pieces (array slices), concatenated virtually.

    Supports ``len()``, integer indexing and contiguous slices (``t[a:b]`` returns a new ndarray holding
    just those tokens), ``dtype``, and ``np.asarray(t)`` (materialises everything; for tests and small data).
    """

    def __init__(self, pieces: Sequence[np.ndarray], dtype=None):
        self.pieces = [p for p in pieces if len(p)]
        if dtype is None:
            dtype = np.result_type(*[p.dtype for p in self.pieces]) if self.pieces else np.int64
        self.dtype = np.dtype(dtype)
        self.starts = np.zeros(len(self.pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self.pieces], out=self.starts[1:])
        self._starts = self.starts.tolist()  # plain ints: bisect on them is the fast path for small slices

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"token {key} out of range for {n} tokens")
            j = bisect.bisect_right(self._starts, i) - 1
            return self.pieces[j][i - self._starts[j]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ConcatTokens supports integers and contiguous slices only")
        lo, hi, _ = key.indices(n)
        out = np.empty(max(hi - lo, 0), dtype=self.dtype)
        if hi <= lo:
            return out
        starts = self._starts
        j = bisect.bisect_right(starts, lo) - 1
        if hi <= starts[j + 1]:  # inside one piece (the common case)
            out[:] = self.pieces[j][lo - starts[j]:hi - starts[j]]
            return out
        pos = lo
        while pos < hi:
            p0 = starts[j]
            take = min(hi, starts[j + 1]) - pos
            out[pos - lo:pos - lo + take] = self.pieces[j][pos - p0:pos - p0 + take]
            pos += take
            j += 1
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[0:len(self)]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ConcatTokens({len(self.pieces)} pieces, {len(self)} tokens, {self.dtype.name})"


@dataclass
class DocumentPart:
    """Some documents of one source: ``tokens`` (flat) and ``doc_offsets`` ([n+1]) of the source, and the
    sorted indices of the documents taken (None = all)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    select: np.ndarray | None = None


class DocumentView(DocumentSequence):
    """The selected documents of several parts, as one flat stream (no token is copied).

    Consecutive selected documents of a part become one piece, so a held-out split with ``v`` validation
    documents costs about ``v`` pieces.
    """

    def __init__(self, parts: Sequence[DocumentPart], dtype=None):
        pieces: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for part in parts:
            offs = np.asarray(part.doc_offsets, dtype=np.int64)
            n = len(offs) - 1
            sel = np.arange(n, dtype=np.int64) if part.select is None else np.asarray(part.select, np.int64)
            if not len(sel):
                continue
            lengths.append(offs[sel + 1] - offs[sel])
            # runs of consecutive documents -> one contiguous token range each
            cut = np.flatnonzero(np.diff(sel) != 1) + 1
            run_first = sel[np.concatenate([[0], cut])]
            run_last = sel[np.concatenate([cut - 1, [len(sel) - 1]])]
            for a, b in zip(offs[run_first].tolist(), offs[run_last + 1].tolist()):
                if b > a:
                    pieces.append(part.tokens[a:b])
        self.doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.doc_offsets = np.zeros(len(self.doc_lengths) + 1, dtype=np.int64)
        np.cumsum(self.doc_lengths, out=self.doc_offsets[1:])
        self.num_tokens = int(self.doc_offsets[-1])
        if len(pieces) == 1 and len(pieces[0]) == self.num_tokens:
            self.tokens = pieces[0]  # a single memmap slice: the loader reads it directly
        else:
            self.tokens = ConcatTokens(pieces, dtype)
        self.dtype = np.dtype(dtype if dtype is not None else self.tokens.dtype).type


    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"DocumentView(docs={len(self)}, tokens={self.num_tokens}, dtype={np.dtype(self.dtype).name})"


# ----------------------------------------------------------------------------- held-out split
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (vectorised): a fast, well-mixed, platform-independent hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def holdout_mask(num_docs: int, valid_fraction: float, seed: int, key: str) -> np.ndarray:
    """Seeded document-level held-out split: ``True`` = validation. Document ``i`` is held out when the
    hash of ``(seed, key, i)`` falls below ``valid_fraction``, so the split depends only on those (not on
    the data or on other sources) and nothing is rewritten. With >= 2 documents each side gets at least one; a
    single document is never held out (it is all the training data of its source).
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    salt = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    scores = _mix64(np.arange(num_docs, dtype=np.uint64) ^ np.uint64(salt))
    threshold = np.uint64(min(int(valid_fraction * 2.0 ** 64), 2 ** 64 - 1))
    mask = scores < threshold
    if num_docs == 1:
        mask[0] = False
    elif num_docs >= 2:
        if not mask.any():
            mask[int(np.argmin(scores))] = True
        if mask.all():
            mask[int(np.argmax(scores))] = False
    return mask


# ----------------------------------------------------------------------------- token-id scan
@dataclass
class IdScan:
    """The smallest and largest token id seen, and how many tokens were read to find them."""

    min_id: int
    max_id: int
    scanned: int
    total: int

    @property
    def complete(self) -> bool:
        return self.scanned >= self.total


def scan_ids(arrays: Sequence[np.ndarray], budget_tokens: int | None, block: int = 1 << 18) -> IdScan:
    """Min/max token id over ``arrays``: every token when their total is at most ``budget_tokens`` (or
    ``budget_tokens`` is None), else ``budget_tokens`` tokens in evenly spaced blocks (first and last
    block included). Reads memory-mapped data page by page; allocates at most one block."""
    arrays = [a for a in arrays if len(a)]
    total = int(sum(len(a) for a in arrays))
    lo, hi, scanned = None, None, 0
    if total == 0:
        return IdScan(0, -1, 0, 0)

    def see(x):
        nonlocal lo, hi, scanned
        if len(x):
            a, b = int(x.min()), int(x.max())
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
            scanned += len(x)

    if budget_tokens is None or total <= budget_tokens:
        for a in arrays:
            for s in range(0, len(a), block * 16):
                see(np.asarray(a[s:s + block * 16]))
        return IdScan(lo, hi, scanned, total)
    n_blocks = max(2, int(budget_tokens) // block)
    starts = np.linspace(0, total - block, n_blocks).astype(np.int64) if total > block else np.zeros(1, np.int64)
    bounds = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=bounds[1:])
    for g in np.unique(starts).tolist():
        j = int(np.searchsorted(bounds, g, side="right")) - 1
        a = arrays[j]
        s = g - int(bounds[j])
        see(np.asarray(a[s:s + block]))
    return IdScan(lo, hi, scanned, total)

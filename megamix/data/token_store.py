"""A Megatron ``MMapIndexedDataset``-compatible token store: ``<prefix>.bin`` + ``<prefix>.idx``.

``.bin`` holds every document's token ids back to back in one dtype (no separators added here;
callers append EOS themselves). ``.idx`` is Megatron's index layout, little-endian:

==========================  ===========================================================
bytes                        content
==========================  ===========================================================
9                            header ``b"MMIDIDX\\x00\\x00"``
8  (``<Q``)                  version, always 1
1  (``<B``)                  dtype code (see :data:`DTYPE_CODES`)
8  (``<Q``)                  S = number of sequences
8  (``<Q``)                  D = number of document-index entries (documents + 1)
4*S (int32)                  sequence lengths, in tokens
8*S (int64)                  sequence pointers, byte offsets into ``.bin``
8*D (int64)                  document indices: document j is sequences [d[j], d[j+1])
==========================  ===========================================================

This writer stores one sequence per document, so ``d = 0..S``. The reader also accepts Megatron
files with several sequences per document (a document is then the concatenation of its
sequences, which Megatron stores contiguously).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from megamix.data.errors import DataError
from megamix.data.views import DocumentSequence
from megamix.io import atomic_path, tmp_path

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

#: Megatron's ``DType`` enum codes.
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES: dict[int, type] = {v: k for k, v in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> type:
    """The token dtype for a vocabulary of ``vocab_size`` ids, chosen as Megatron's
    ``DType.optimal_dtype`` does: ``uint16`` when ``vocab_size < 65500``, else ``int32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.uint16 if vocab_size < 65500 else np.int32


def _canon_dtype(dtype) -> type:
    t = np.dtype(dtype).type
    if t not in DTYPE_CODES:
        raise ValueError(f"unsupported token dtype {np.dtype(dtype)}; "
                         f"use one of {[np.dtype(d).name for d in DTYPE_CODES]}")
    return t


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    p = str(prefix)
    if p.endswith(".bin") or p.endswith(".idx"):
        p = p[:-4]
    return Path(p + ".bin"), Path(p + ".idx")


class IndexedTokenWriter:
    """Stream documents into ``<prefix>.bin`` and write ``<prefix>.idx`` on :meth:`finalize`.

    Files are written under temporary names and renamed into place by ``finalize``, so a reader
    never sees a half-written store. Usable as a context manager (finalizes on clean exit).

    Args:
        prefix: path without extension (``tokens/legal/train``).
        dtype: token dtype; ``np.uint16`` for vocabularies under 65500 ids.
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.dtype = _canon_dtype(dtype)
        self.bin_path, self.idx_path = _paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = tmp_path(self.bin_path)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._finalized = False
        info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
        self._lo, self._hi = (info.min, info.max) if info is not None else (None, None)
        self.max_token_id = -1  # largest id written so far (-1 = none); recorded in the store manifest

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        """Append one document (possibly empty) of token ids."""
        if self._finalized:
            raise RuntimeError("add_document() after finalize()")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and self._lo is not None:
            if not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._lo or hi > self._hi:
                raise ValueError(f"token id out of range for {np.dtype(self.dtype).name}: "
                                 f"min {lo}, max {hi}")
            self.max_token_id = max(self.max_token_id, hi)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Close ``.bin`` and write the Megatron ``.idx``; both appear atomically."""
        if self._finalized:
            return
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2^31-1 tokens (Megatron stores int32 lengths)")
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        with atomic_path(self.idx_path) as tmp_idx:
            with open(tmp_idx, "wb") as f:
                f.write(INDEX_HEADER)
                f.write(struct.pack("<Q", INDEX_VERSION))
                f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
                f.write(struct.pack("<Q", len(lengths)))
                f.write(struct.pack("<Q", len(doc_idx)))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(doc_idx.astype("<i8").tobytes())
            os.replace(self._tmp_bin, self.bin_path)   # the .bin first; the .idx replaces its own as the block ends
        self._finalized = True

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._bin.closed:
            self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._finalized = True

    def __enter__(self) -> "IndexedTokenWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


@dataclass
class IndexInfo:
    """A validated ``.bin/.idx`` pair (see :func:`check_index`)."""

    bin_path: Path
    idx_path: Path
    dtype: type
    sequence_lengths: np.ndarray   # int64 [S]
    document_indices: np.ndarray   # int64 [D] (D = documents + 1)
    doc_offsets: np.ndarray        # int64 [D] token offset of each document start (last = num_tokens)
    num_tokens: int
    multimodal: bool = False       # the index carries Megatron's per-sequence mode bytes


def _index_error(path: Path, what: str, fix: str | None = None) -> DataError:
    fix = fix or ("rewrite it (Megatron's tools/preprocess_data.py, or `megamix data tokenize --force`) "
                  "or point the setting at an intact .bin/.idx pair")
    return DataError(f"{path}: {what}; {fix}")


def check_index(prefix: str | Path) -> IndexInfo:
    """Validate a Megatron ``MMIDIDX`` ``.bin/.idx`` pair and return its layout.

    This is the one place the pair is checked: both files exist; the header magic, version and dtype
    code are Megatron's; the ``.idx`` size is exactly the layout its counts describe (optionally
    followed by Megatron's per-sequence mode bytes); sequence pointers are contiguous byte offsets that
    match the lengths; document indices run from 0 to the sequence count without going back; and the
    ``.bin`` holds exactly the tokens the index describes. The ``.idx`` is memory-mapped (its arrays
    are read once to compute offsets), the ``.bin`` is only ``stat``-ed. Any problem raises
    :class:`~megamix.data.errors.DataError` with a one-line message naming the file.
    """
    bin_path, idx_path = _paths(prefix)
    for f in (idx_path, bin_path):
        if f.is_dir():
            raise DataError(f"{f} is a directory, not a Megatron {f.suffix} file; pass the path prefix "
                            f"of a .bin/.idx pair (e.g. /data/web_text_document)")
        if not f.is_file():
            raise DataError(f"{f} does not exist; pass the path prefix of an existing .bin/.idx pair "
                            f"(e.g. /data/web_text_document for web_text_document.bin/.idx)")
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as fh:
        head = fh.read(34)
    if head[:9] != INDEX_HEADER:
        raise _index_error(idx_path, f"not a Megatron MMIDIDX index (magic {head[:9]!r}, expected "
                                     f"{INDEX_HEADER!r})")
    if len(head) < 34:
        raise _index_error(idx_path, f"truncated index: {size} bytes, the header alone needs 34")
    (version,) = struct.unpack_from("<Q", head, 9)
    if version != INDEX_VERSION:
        raise _index_error(idx_path, f"unsupported index version {version} (Megatron writes 1)")
    (code,) = struct.unpack_from("<B", head, 17)
    if code not in CODE_DTYPES:
        raise _index_error(idx_path, f"unknown dtype code {code} (Megatron's codes are "
                                     f"{sorted(CODE_DTYPES)})")
    dtype = CODE_DTYPES[code]
    seq_count, doc_count = struct.unpack_from("<QQ", head, 18)
    need = 34 + 12 * seq_count + 8 * doc_count
    if size < need:
        raise _index_error(idx_path, f"truncated index: {size} bytes, but its {seq_count} sequences and "
                                     f"{doc_count} document entries need {need}")
    if size not in (need, need + seq_count):
        raise _index_error(idx_path, f"{size - need} unexpected bytes after the layout its counts describe "
                                     f"({need} bytes); the header counts do not match the file")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    lengths = np.frombuffer(mm, dtype="<i4", count=seq_count, offset=34).astype(np.int64)
    pointers = np.frombuffer(mm, dtype="<i8", count=seq_count, offset=34 + 4 * seq_count)
    doc_idx = np.frombuffer(mm, dtype="<i8", count=doc_count, offset=34 + 12 * seq_count).astype(np.int64)
    if seq_count and lengths.min() < 0:
        raise _index_error(idx_path, "negative sequence length in the index")
    itemsize = np.dtype(dtype).itemsize
    seq_offsets = np.zeros(seq_count + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    if seq_count and not np.array_equal(pointers, seq_offsets[:-1] * itemsize):
        bad = int(np.flatnonzero(pointers != seq_offsets[:-1] * itemsize)[0])
        raise _index_error(idx_path, f"sequence {bad} points at byte {int(pointers[bad])} but the lengths "
                                     f"before it end at byte {int(seq_offsets[bad]) * itemsize} (pointers must "
                                     "be contiguous, as Megatron writes them)")
    if doc_count == 0 or doc_idx[0] != 0 or doc_idx[-1] != seq_count or np.any(np.diff(doc_idx) < 0):
        first = int(doc_idx[0]) if doc_count else None
        last = int(doc_idx[-1]) if doc_count else None
        raise _index_error(idx_path, f"malformed document indices (first {first}, last {last}; they must run "
                                     f"from 0 to the sequence count {seq_count} without going back)")
    num_tokens = int(seq_offsets[-1])
    bin_size = bin_path.stat().st_size
    if bin_size != num_tokens * itemsize:
        what = "truncated" if bin_size < num_tokens * itemsize else "longer than its index"
        raise _index_error(bin_path, f"{what}: {bin_size} bytes, but {idx_path.name} describes {num_tokens} "
                                     f"{np.dtype(dtype).name} tokens = {num_tokens * itemsize} bytes (an "
                                     f"interrupted write, or the .idx of another .bin)")
    return IndexInfo(bin_path=bin_path, idx_path=idx_path, dtype=dtype, sequence_lengths=lengths,
                     document_indices=doc_idx, doc_offsets=seq_offsets[doc_idx], num_tokens=num_tokens,
                     multimodal=size == need + seq_count and seq_count > 0)


def read_index_header(prefix: str | Path) -> tuple[type, int, int]:
    """``(dtype, sequences, document entries)`` from the first 34 bytes of the ``.idx`` (no validation of
    the rest; :func:`check_index` does that)."""
    _, idx_path = _paths(prefix)
    with open(idx_path, "rb") as fh:
        head = fh.read(34)
    if head[:9] != INDEX_HEADER or len(head) < 34:
        raise _index_error(idx_path, "not a Megatron MMIDIDX index (bad magic or truncated header)")
    (code,) = struct.unpack_from("<B", head, 17)
    if code not in CODE_DTYPES:
        raise _index_error(idx_path, f"unknown dtype code {code}")
    seq_count, doc_count = struct.unpack_from("<QQ", head, 18)
    return CODE_DTYPES[code], int(seq_count), int(doc_count)


def read_index(idx_path: str | Path) -> dict:
    """Parse and validate a Megatron ``.idx`` (and its ``.bin``) into its fields."""
    info = check_index(idx_path)
    lengths = info.sequence_lengths
    itemsize = np.dtype(info.dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * itemsize]).astype(np.int64) if len(lengths) \
        else np.zeros(0, np.int64)
    return {"version": INDEX_VERSION, "dtype_code": DTYPE_CODES[info.dtype], "dtype": info.dtype,
            "sequence_lengths": lengths, "sequence_pointers": pointers, "document_indices": info.document_indices}


class IndexedTokenDataset(DocumentSequence):
    """Read a ``<prefix>.bin/.idx`` store (ours or Megatron's) through a read-only memmap.

    Attributes:
        doc_lengths: int64 [N] tokens per document.
        doc_offsets: int64 [N+1] token offsets of each document in :attr:`tokens`.
        tokens: the flat token array (``np.memmap``, read-only).
        num_tokens: total tokens.
        dtype: the token dtype.
    """

    def __init__(self, prefix: str | Path):
        info = check_index(prefix)
        self.bin_path, self.idx_path = info.bin_path, info.idx_path
        self.dtype = info.dtype
        self.sequence_lengths = info.sequence_lengths
        self.document_indices = info.document_indices
        self.doc_offsets = info.doc_offsets
        self.doc_lengths = np.diff(self.doc_offsets)
        self.num_tokens = info.num_tokens
        if self.num_tokens == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"IndexedTokenDataset({str(self.bin_path)[:-4]!r}, docs={len(self)}, "
                f"tokens={self.num_tokens}, dtype={np.dtype(self.dtype).name})")


def write_documents(prefix: str | Path, docs: Iterable[Iterable[int]], dtype=np.uint16) -> None:
    """Write an iterable of token-id documents to ``prefix`` in one go."""
    with IndexedTokenWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)

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
from pathlib import Path
from typing import Iterable

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

#: Megatron's ``DType`` enum codes.
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES: dict[int, type] = {v: k for k, v in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> type:
    """The smallest token dtype Megatron would pick: uint16 below 65500 ids, else int32."""
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
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + f".tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._finalized = False
        info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
        self._lo, self._hi = (info.min, info.max) if info is not None else (None, None)

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
        tmp_idx = self.idx_path.with_name(self.idx_path.name + f".tmp{os.getpid()}")
        with open(tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, self.idx_path)
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


def read_index(idx_path: str | Path) -> dict:
    """Parse a Megatron ``.idx`` file into its fields (numpy arrays are copies)."""
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise FileNotFoundError(f"index file {idx_path} does not exist")
    buf = idx_path.read_bytes()
    if buf[:9] != INDEX_HEADER:
        raise ValueError(f"{idx_path} is not a Megatron MMapIndexedDataset index "
                         f"(header {buf[:9]!r}, expected {INDEX_HEADER!r})")
    if len(buf) < 34:
        raise ValueError(f"{idx_path} is truncated ({len(buf)} bytes)")
    (version,) = struct.unpack_from("<Q", buf, 9)
    if version != INDEX_VERSION:
        raise ValueError(f"{idx_path}: unsupported index version {version} (expected 1)")
    (code,) = struct.unpack_from("<B", buf, 17)
    if code not in CODE_DTYPES:
        raise ValueError(f"{idx_path}: unknown dtype code {code}")
    seq_count, doc_count = struct.unpack_from("<QQ", buf, 18)
    off = 34
    need = off + 4 * seq_count + 8 * seq_count + 8 * doc_count
    if len(buf) < need:
        raise ValueError(f"{idx_path} is truncated: {len(buf)} bytes, layout needs {need}")
    lengths = np.frombuffer(buf, dtype="<i4", count=seq_count, offset=off).astype(np.int64)
    off += 4 * seq_count
    pointers = np.frombuffer(buf, dtype="<i8", count=seq_count, offset=off).astype(np.int64)
    off += 8 * seq_count
    doc_idx = np.frombuffer(buf, dtype="<i8", count=doc_count, offset=off).astype(np.int64)
    return {"version": version, "dtype_code": code, "dtype": CODE_DTYPES[code],
            "sequence_lengths": lengths, "sequence_pointers": pointers, "document_indices": doc_idx}


class IndexedTokenDataset:
    """Read a ``<prefix>.bin/.idx`` store (ours or Megatron's) through a read-only memmap.

    Attributes:
        doc_lengths: int64 [N] tokens per document.
        doc_offsets: int64 [N+1] token offsets of each document in :attr:`tokens`.
        tokens: the flat token array (``np.memmap``, read-only).
        num_tokens: total tokens.
        dtype: the token dtype.
    """

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = _paths(prefix)
        if not self.bin_path.is_file():
            raise FileNotFoundError(f"token file {self.bin_path} does not exist")
        idx = read_index(self.idx_path)
        self.dtype = idx["dtype"]
        itemsize = np.dtype(self.dtype).itemsize
        lengths, pointers = idx["sequence_lengths"], idx["sequence_pointers"]
        doc_idx = idx["document_indices"]
        self.sequence_lengths = lengths
        self.document_indices = doc_idx
        if len(lengths):
            expect = np.concatenate([[0], np.cumsum(lengths[:-1] * itemsize)])
            if pointers[0] != 0 or not np.array_equal(pointers, expect):
                raise ValueError(f"{self.idx_path}: sequence pointers are not contiguous; "
                                 "this reader supports only packed stores")
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths) \
                or np.any(np.diff(doc_idx) < 0):
            raise ValueError(f"{self.idx_path}: malformed document indices "
                             f"(first {doc_idx[:1]}, last {doc_idx[-1:]}, sequences {len(lengths)})")
        seq_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=seq_offsets[1:])
        self.doc_offsets = seq_offsets[doc_idx]
        self.doc_lengths = np.diff(self.doc_offsets)
        self.num_tokens = int(seq_offsets[-1])
        size = self.bin_path.stat().st_size
        if size != self.num_tokens * itemsize:
            raise ValueError(f"{self.bin_path} has {size} bytes but the index describes "
                             f"{self.num_tokens} tokens of {itemsize} bytes")
        if self.num_tokens == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i %= n
        return np.asarray(self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]])

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

"""Megatron-compatible .bin/.idx token store."""
import struct

import numpy as np
import pytest

from megamix.data.token_store import (DTYPE_CODES, INDEX_HEADER, IndexedTokenDataset,
                                      IndexedTokenWriter, best_dtype, read_index, write_documents)


def _docs(rng, n=50, vmax=50257):
    lens = rng.integers(0, 40, size=n)
    lens[[0, 7, n - 1]] = 0  # empty documents, including first and last
    return [rng.integers(0, vmax, size=int(k)) for k in lens]


def test_round_trip_ragged_and_empty(tmp_path):
    rng = np.random.default_rng(0)
    docs = _docs(rng)
    with IndexedTokenWriter(tmp_path / "a", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    ds = IndexedTokenDataset(tmp_path / "a")
    assert len(ds) == len(docs)
    assert ds.dtype is np.uint16
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.doc_lengths.tolist() == [len(d) for d in docs]
    assert ds.doc_offsets[0] == 0 and ds.doc_offsets[-1] == ds.num_tokens
    assert len(ds.doc_offsets) == len(docs) + 1
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.tolist()
    assert ds[-1].tolist() == docs[-1].tolist()
    flat = np.concatenate(docs)
    assert np.array_equal(np.asarray(ds.tokens), flat)
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_megatron_index_layout_bytes(tmp_path):
    docs = [[1, 2, 3], [], [4, 5], [65535]]
    write_documents(tmp_path / "m", docs, np.uint16)
    raw = (tmp_path / "m.idx").read_bytes()
    assert raw[:9] == INDEX_HEADER == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9)[0] == 1  # version
    assert struct.unpack_from("<B", raw, 17)[0] == 8  # Megatron DType.uint16
    seqs, ndoc = struct.unpack_from("<QQ", raw, 18)
    assert (seqs, ndoc) == (4, 5)
    off = 34
    lengths = np.frombuffer(raw, "<i4", 4, off)
    pointers = np.frombuffer(raw, "<i8", 4, off + 16)
    doc_idx = np.frombuffer(raw, "<i8", 5, off + 48)
    assert lengths.tolist() == [3, 0, 2, 1]
    assert pointers.tolist() == [0, 6, 6, 10]  # byte offsets, 2 bytes per token
    assert doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert len(raw) == off + 16 + 32 + 40
    assert (tmp_path / "m.bin").read_bytes() == np.array([1, 2, 3, 4, 5, 65535], "<u2").tobytes()
    assert read_index(tmp_path / "m.idx")["dtype"] is np.uint16


def test_int32_codes_and_multi_sequence_documents(tmp_path):
    assert DTYPE_CODES[np.int32] == 4 and best_dtype(50257) is np.uint16 and best_dtype(100000) is np.int32
    # hand-write a Megatron index with 3 sequences grouped into 2 documents: [s0, s1], [s2]
    toks = np.array([7, 8, 9, 10, 11, 12], dtype=np.int32)
    (tmp_path / "x.bin").write_bytes(toks.tobytes())
    lengths = np.array([2, 1, 3], "<i4")
    pointers = np.array([0, 8, 12], "<i8")
    doc_idx = np.array([0, 2, 3], "<i8")
    with open(tmp_path / "x.idx", "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 3, 3))
        f.write(lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    ds = IndexedTokenDataset(tmp_path / "x")
    assert len(ds) == 2 and ds.num_tokens == 6
    assert ds[0].tolist() == [7, 8, 9] and ds[1].tolist() == [10, 11, 12]


def test_empty_store_and_errors(tmp_path):
    write_documents(tmp_path / "e", [], np.uint16)
    ds = IndexedTokenDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
    with pytest.raises(ValueError, match="out of range"):
        IndexedTokenWriter(tmp_path / "o", np.uint16).add_document([70000])
    with pytest.raises(ValueError, match="unsupported"):
        IndexedTokenWriter(tmp_path / "o2", np.uint32)
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + b"\x00" * 40)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a Megatron"):
        IndexedTokenDataset(tmp_path / "bad")
    # size mismatch between .bin and .idx
    write_documents(tmp_path / "s", [[1, 2, 3]], np.uint16)
    (tmp_path / "s.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="bytes"):
        IndexedTokenDataset(tmp_path / "s")


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedTokenWriter(tmp_path / "f", np.uint16) as w:
            w.add_document([1, 2])
            raise RuntimeError("boom")
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.idx").exists()
    assert list(tmp_path.iterdir()) == []


def test_byte_identical_to_megatron_core(tmp_path):
    """When megatron-core is importable, its builder must write the very same bytes, and each reader
    must read the other's files. (Checked against megatron-core 0.16.1.)"""
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50257, size=int(k)).astype(np.uint16) for k in rng.integers(0, 50, 30)]
    write_documents(tmp_path / "ours", docs, np.uint16)
    b = mi.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in docs:
        b.add_item(torch.from_numpy(d.astype(np.int64)))
        b.end_document()
    b.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    m = mi.IndexedDataset(str(tmp_path / "ours"))
    assert all(np.array_equal(m[i], docs[i]) for i in range(len(docs)))


def test_check_index_names_every_kind_of_damage(tmp_path):
    """One validation function (check_index): each kind of broken pair gives a one-line DataError (a
    ConfigError, so the CLI exits 2) that names the file."""
    from megamix.configbase import ConfigError
    from megamix.data.errors import DataError
    from megamix.data.token_store import check_index

    docs = [[1, 2, 3], [4, 5], [6]]
    write_documents(tmp_path / "good", docs, np.int32)
    good_idx, good_bin = (tmp_path / "good.idx").read_bytes(), (tmp_path / "good.bin").read_bytes()
    info = check_index(tmp_path / "good")
    assert info.num_tokens == 6 and info.doc_offsets.tolist() == [0, 3, 5, 6] and info.dtype is np.int32

    def case(name, idx: bytes, bin_: bytes, pattern: str):
        (tmp_path / f"{name}.idx").write_bytes(idx)
        (tmp_path / f"{name}.bin").write_bytes(bin_)
        with pytest.raises(DataError, match=pattern) as e:
            check_index(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and isinstance(e.value, ConfigError), msg

    case("magic", b"NOTMEGA!!" + good_idx[9:], good_bin, "not a Megatron MMIDIDX index")
    case("version", good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:], good_bin, "unsupported index version 2")
    case("code", good_idx[:17] + bytes([42]) + good_idx[18:], good_bin, "unknown dtype code 42")
    case("shortidx", good_idx[:-5], good_bin, "truncated index")
    case("header", good_idx[:20], good_bin, "truncated index")
    case("extra", good_idx + b"\x00" * 7, good_bin, "unexpected bytes")
    case("shortbin", good_idx, good_bin[:-4], r"shortbin.bin: truncated: 20 bytes, .* 6 int32 tokens = 24 bytes")
    case("longbin", good_idx, good_bin + good_bin, "longer than its index")
    # an index that belongs to another .bin: same dtype, other lengths
    write_documents(tmp_path / "other", [[9] * 3, [8]], np.int32)
    case("mismatch", (tmp_path / "other.idx").read_bytes(), good_bin, "the .idx of another .bin")
    # pointers that do not follow the lengths
    bad_ptr = bytearray(good_idx)
    struct.pack_into("<q", bad_ptr, 34 + 4 * 3 + 8, 999)
    case("pointers", bytes(bad_ptr), good_bin, "sequence 1 points at byte 999")
    bad_doc = bytearray(good_idx)
    struct.pack_into("<q", bad_doc, 34 + 12 * 3 + 8, 7)
    case("docidx", bytes(bad_doc), good_bin, "malformed document indices")
    with pytest.raises(DataError, match="missing.idx does not exist"):
        check_index(tmp_path / "missing")
    (tmp_path / "dir.idx").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        check_index(tmp_path / "dir")
    # Megatron's multimodal indices carry one mode byte per sequence after the layout: accepted
    (tmp_path / "mm.idx").write_bytes(good_idx + b"\x00" * 3)
    (tmp_path / "mm.bin").write_bytes(good_bin)
    assert check_index(tmp_path / "mm").multimodal

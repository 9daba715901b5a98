"""Token data in place (megamix.data.backings): Megatron blends, prefix groups, explicit and held-out validation,
tokenised Arrow datasets; vocabulary checks; the loader reading them through the one TokenStore interface."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from megamix.configbase import ConfigError
from megamix.data.backings import open_store, parse_paths
from megamix.data.errors import DataError
from megamix.data.token_store import write_documents
from megamix.data.views import ConcatTokens, DocumentView


def _cfg(paths, **kw):
    base = dict(paths=paths, valid_paths=[], tokenizer="", valid_fraction=0.1, seed=3, vocab_check_mb=64.0,
                data_dir="unused")
    base.update(kw)
    return SimpleNamespace(**base)


def _docs(rng, n, lo=0, hi=1000, eos=None):
    out = []
    for k in rng.integers(1, 30, size=n):
        d = rng.integers(lo, hi, size=int(k))
        if eos is not None:
            d[-1] = eos
        out.append(d)
    return out


def _memmap_of(arr, path) -> bool:
    return isinstance(arr, np.memmap) and str(arr.filename) == str(path.resolve())


def test_parse_paths_forms_and_errors():
    g = parse_paths([0.3, "/a/web_text_document", "0.7", "/b/code.bin"])
    assert [(x.name, x.paths, x.weight) for x in g] == [("web", ["/a/web_text_document"], 0.3),
                                                        ("code", ["/b/code.bin"], 0.7)]
    assert [(x.name, x.weight) for x in parse_paths(["/a/x", "/b/y_text_document"])] == [("x", None), ("y", None)]
    g = parse_paths({"web": "/a/x", "code": ["/b/c1", "/b/c2"]})
    assert [(x.name, x.paths) for x in g] == [("web", ["/a/x"]), ("code", ["/b/c1", "/b/c2"])]
    assert parse_paths("/a/only")[0].name == "only" and parse_paths([]) == []
    bad = [([0.3, "/a/x", 0.7], "alternates weight and prefix"),
           ([0, "/a/x"], "must be a finite number > 0"),
           (["nan", "/a/x"], "must be a finite number > 0"),
           (["/a/x", "/b/x"], "two entries give the domain name 'x'.*mapping form"),
           ({"a b": "/x"}, "invalid domain name 'a b'"),
           ({"x": []}, "empty list"),
           (5, "expected a list"),
           ([0.5, 7], "alternates")]
    for value, pattern in bad:
        with pytest.raises(DataError, match=pattern):
            parse_paths(value)
    from megamix.config import MegamixConfig
    with pytest.raises(ConfigError, match="data.paths: a weighted blend"):
        MegamixConfig.from_yaml(None, ["data.paths=[0.5, /a/x, 0.5]"]).validate()
    with pytest.raises(ConfigError, match="data.valid_paths needs data.paths"):
        MegamixConfig.from_yaml(None, ["data.valid_paths=[/a/x]"]).validate()


def test_megatron_blend_in_place(tmp_path):
    """A weighted blend of two prefixes (int32 and uint16) is read by memory map, never copied or rewritten;
    weights are normalised into the natural mixture; the held-out split is seeded, disjoint and recorded."""
    rng = np.random.default_rng(0)
    web, code = _docs(rng, 200, 0, 70000, eos=0), _docs(rng, 120, 0, 30000)
    write_documents(tmp_path / "web_text_document", web, np.int32)
    write_documents(tmp_path / "code_text_document", code, np.uint16)
    before = {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in tmp_path.iterdir()}
    store = open_store(_cfg([1, str(tmp_path / "web_text_document"), 3, str(tmp_path / "code_text_document")]))
    assert store.domains == ["code", "web"] and store.root is None
    assert store.blend_weights() == {"code": 0.75, "web": 0.25}
    assert store.natural_sizes(["web", "code"]) == [0.25, 0.75]
    assert store.vocab_size is None and store.tokenizer is None and store.eos_id == 0
    for name, docs, path in (("web", web, tmp_path / "web_text_document.bin"),
                             ("code", code, tmp_path / "code_text_document.bin")):
        tr, va = store.dataset(name, "train"), store.dataset(name, "valid")
        assert isinstance(tr, DocumentView) and isinstance(tr.tokens, ConcatTokens)
        assert all(_memmap_of(p, path) for p in tr.tokens.pieces + va.tokens.pieces)  # views of the file, no copy
        got = sorted(map(tuple, [*tr, *va]))
        assert got == sorted(tuple(d.tolist()) for d in docs)          # every document exactly once
        assert 1 <= len(va) < 0.3 * len(docs) and len(tr) + len(va) == len(docs)
        assert store.num_tokens(name) == tr.num_tokens == len(tr.tokens)
        assert np.array_equal(np.asarray(tr.tokens), np.concatenate(list(tr)))
        rec = store.manifest["domains"][name]
        assert rec["holdout"]["documents"] == len(va) and rec["holdout"]["seed"] == 3
        assert rec["train_max_token_id"] == max(int(d.max()) for d in docs) and rec["train_id_scan"] == "all tokens read"
    assert store.dataset("web").dtype is np.int32 and store.dataset("code").dtype is np.uint16
    assert store.max_token_id == max(int(d.max()) for d in web)
    # deterministic: same seed, same split; another seed, another split
    again = open_store(_cfg([1, str(tmp_path / "web_text_document"), 3, str(tmp_path / "code_text_document")]))
    assert [d.tolist() for d in again.dataset("web", "valid")] == [d.tolist() for d in store.dataset("web", "valid")]
    other = open_store(_cfg([str(tmp_path / "web_text_document")], seed=4))
    assert [d.tolist() for d in other.dataset("web", "valid")] != [d.tolist() for d in store.dataset("web", "valid")]
    assert other.blend_weights() is None and other.natural_sizes() == [float(other.num_tokens("web"))]
    assert {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in tmp_path.iterdir()} == before
    # the model check: ids beyond the model's vocabulary are a one-line error naming domain and file
    with pytest.raises(DataError, match=r"domain 'web' .*web_text_document.* token id 6\d{4} >= model.vocab_size=50257"):
        store.check_vocab(50257)
    store.check_vocab(70000)


def test_groups_valid_paths_and_vocab_checks(tmp_path):
    rng = np.random.default_rng(1)
    a, b, v = _docs(rng, 30, 0, 500), _docs(rng, 20, 0, 500), _docs(rng, 7, 0, 500)
    for name, docs in (("a", a), ("b", b), ("v", v)):
        write_documents(tmp_path / name, docs, np.uint16)
    cfg = _cfg({"code": [str(tmp_path / "a"), str(tmp_path / "b.idx")]}, valid_paths={"code": str(tmp_path / "v")})
    store = open_store(cfg)
    tr, va = store.dataset("code"), store.dataset("code", "valid")
    assert [d.tolist() for d in tr] == [d.tolist() for d in a + b]   # a group is its prefixes, in order
    assert [d.tolist() for d in va] == [d.tolist() for d in v]
    assert store.manifest["domains"]["code"]["valid_from"] == [f"data.valid_paths: {tmp_path / 'v'}"]
    assert "holdout" not in store.manifest["domains"]["code"]
    with pytest.raises(DataError, match=r"data.valid_paths names domains \['web'\]"):
        open_store(_cfg([str(tmp_path / "a")], valid_paths={"web": str(tmp_path / "v")}))
    # data.tokenizer given: ids are checked against its vocabulary when the store opens
    write_documents(tmp_path / "big", [[5, 60000, 7], [1]], np.int32)
    with pytest.raises(DataError, match=r"big: holds token id 60000 >= 50257, the vocabulary of data.tokenizer='gpt2'"):
        open_store(_cfg([str(tmp_path / "big")], tokenizer="gpt2"))
    gpt2 = open_store(_cfg([str(tmp_path / "a")], tokenizer="gpt2"))
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.tokenizer) == (50257, 50256, "gpt2")
    with pytest.raises(DataError, match="model.vocab_size=1000 is smaller than the vocabulary .*50257"):
        open_store(_cfg([str(tmp_path / "a")], tokenizer="gpt2"), model_vocab_size=1000)
    write_documents(tmp_path / "neg", [[5, -3]], np.int32)
    with pytest.raises(DataError, match="negative token id -3"):
        open_store(_cfg([str(tmp_path / "neg")]))
    write_documents(tmp_path / "flt", [[1.5, 2.0]], np.float32)
    with pytest.raises(DataError, match="float32 values, not token ids"):
        open_store(_cfg([str(tmp_path / "flt")]))
    with pytest.raises(DataError, match="nothere.idx does not exist"):
        open_store(_cfg([str(tmp_path / "nothere")]))
    # a bounded scan reads evenly spaced blocks of large files and says so; -1 reads everything
    big = rng.integers(0, 100, size=3_000_000).astype(np.int32)
    big[-1] = 4242  # in the last block, which the bounded scan always reads
    write_documents(tmp_path / "large", [big[:1_500_000], big[1_500_000:]], np.int32)
    rec = open_store(_cfg([str(tmp_path / "large")], vocab_check_mb=2)).manifest["domains"]["large"]
    assert rec["train_max_token_id"] == 4242 and rec["train_id_scan"].startswith("scanned ")
    rec = open_store(_cfg([str(tmp_path / "large")], vocab_check_mb=-1)).manifest["domains"]["large"]
    assert rec["train_id_scan"] == "all tokens read"


def test_arrow_in_place_without_copy(tmp_path):
    """A tokenised save_to_disk dataset is used in place: its Arrow buffers are memory-mapped (nothing lands
    in Arrow's memory pool), a DatasetDict's own validation split is used, a plain Dataset is held out."""
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(2)
    rows = [d.tolist() for d in _docs(rng, 400, 0, 50000)]
    val = [d.tolist() for d in _docs(rng, 20, 0, 50000)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": rows, "n": list(range(400))}),
                               "validation": datasets.Dataset.from_dict({"input_ids": val})})
    dd.save_to_disk(str(tmp_path / "dd"), num_shards={"train": 3, "validation": 1})
    datasets.Dataset.from_dict({"input_ids": rows[:50]}).save_to_disk(str(tmp_path / "plain"))
    pool = pa.total_allocated_bytes()
    store = open_store(_cfg({"web": str(tmp_path / "dd"), "small": str(tmp_path / "plain")}))
    tr, va = store.dataset("web"), store.dataset("web", "valid")
    assert pa.total_allocated_bytes() - pool < 4096   # 400 rows x ~15 ids x 8 bytes were not copied in
    assert len(tr.tokens.pieces) >= 3 and not any(p.flags.owndata for p in tr.tokens.pieces)
    assert [d.tolist() for d in tr] == rows and [d.tolist() for d in va] == val
    assert store.manifest["domains"]["web"]["valid_from"] == [f"{tmp_path / 'dd'}: own validation split"]
    sm_tr, sm_va = store.dataset("small"), store.dataset("small", "valid")
    assert len(sm_tr) + len(sm_va) == 50 and len(sm_va) >= 1 and "holdout" in store.manifest["domains"]["small"]
    datasets.Dataset.from_dict({"text": ["a b c"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataError, match=r"no 'input_ids' column \(columns: \['text'\]\); tokenise it first"):
        open_store(_cfg([str(tmp_path / "text")]))
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="junk: a folder, but not a Hugging Face save_to_disk dataset"):
        open_store(_cfg([str(tmp_path / "junk")]))


def test_loader_reads_in_place_windows(tmp_path):
    """The loader is unchanged: its windows over an in-place held-out split are the packed stream of the
    selected documents, with positions restarting at each document start."""
    from megamix.loader import MixtureLoader

    rng = np.random.default_rng(3)
    docs = _docs(rng, 150, 1, 900, eos=0)
    write_documents(tmp_path / "x_text_document", docs, np.int32)
    write_documents(tmp_path / "y_text_document", _docs(rng, 90, 1, 900, eos=0), np.uint16)
    store = open_store(_cfg([str(tmp_path / "x_text_document"), str(tmp_path / "y_text_document")]))
    T = 16
    loader = MixtureLoader(store, seq_len=T, global_batch_size=8, micro_batch_size=8,
                           weights=store.natural_sizes(), seed=0)
    streams = {d: np.asarray(store.dataset(d).tokens, dtype=np.int64) for d in store.domains}
    offsets = {d: store.dataset(d).doc_offsets for d in store.domains}
    for _ in range(3):
        (batch,) = loader.next_step()
        for r in range(len(batch)):
            d = store.domains[int(batch.domain_ids[r])]
            i = int(batch.sample_ids[r]) - int(loader.domain_offsets[store.domains.index(d)])
            assert batch.input_ids[r].tolist() == streams[d][i * T:i * T + T].tolist()
            assert batch.labels[r].tolist() == streams[d][i * T + 1:i * T + T + 1].tolist()
            starts = [o - i * T for o in offsets[d].tolist() if i * T < o < i * T + T]
            assert all(int(batch.position_ids[r, s]) == 0 for s in starts)
    json.dumps(store.manifest)  # the record the trainer writes to data_manifest.json is plain JSON


def test_cli_reports_broken_in_place_data_in_one_line(tmp_path, capsys):
    """`megamix train` on a corrupt prefix: exit code 2 and one line naming the file, no traceback."""
    from megamix.cli import main

    write_documents(tmp_path / "web_text_document", [[1, 2, 3], [4, 5]], np.uint16)
    raw = (tmp_path / "web_text_document.bin").read_bytes()
    (tmp_path / "web_text_document.bin").write_bytes(raw[:-2])  # truncated .bin
    rc = main(["train", "--no-progress", "--set", f"train.out_dir={tmp_path / 'run'}",
               "--set", f"data.paths=[{tmp_path / 'web_text_document'}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "web_text_document.bin: truncated: 8 bytes" in err


def test_concat_tokens_matches_numpy():
    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 9, size=int(k)).astype(np.int32) for k in (5, 1, 0, 7, 3)]
    flat = np.concatenate(parts)
    ct = ConcatTokens(parts)
    assert len(ct) == len(flat) and ct.dtype == np.int32 and len(ct.pieces) == 4
    for a in range(-2, len(flat) + 2):
        for b in range(a, len(flat) + 3):
            assert np.array_equal(ct[a:b], flat[a:b]), (a, b)
    assert [int(ct[i]) for i in range(-len(flat), len(flat))] == flat[-len(flat):].tolist() + flat.tolist()
    with pytest.raises(IndexError):
        ct[len(flat)]
    with pytest.raises(TypeError):
        ct[::2]
    assert np.array_equal(np.asarray(ct), flat) and len(ConcatTokens([])) == 0

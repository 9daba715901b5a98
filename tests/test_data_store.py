"""TokenStore over the tiny real store, and the tiny_store fixture itself."""
import json

import numpy as np
import pytest

from megamix.data.store import TokenStore
from megamix.data.testing import TINY_DOMAINS
from megamix.data.tokenizer import get_tokenizer


def test_tiny_store_layout(tiny_store):
    store = TokenStore(tiny_store)
    assert store.domains == sorted(TINY_DOMAINS)
    man = store.manifest
    assert (man["tokenizer"], man["vocab_size"], man["eos_id"]) == ("gpt2", 50257, 50256)
    for d in store.domains:
        for split in ("train", "valid"):
            ds = store.dataset(d, split)
            assert len(ds) == store.num_docs(d, split) >= 1
            assert ds.num_tokens == store.num_tokens(d, split) > 100
            # every document ends with exactly one EOS and has no EOS inside
            ends = ds.doc_offsets[1:] - 1
            assert np.all(np.asarray(ds.tokens)[ends] == 50256)
            assert int((np.asarray(ds.tokens) == 50256).sum()) == len(ds)
    assert store.dataset("legal") is store.dataset("legal", "train")


def test_tiny_store_text_matches_corpus(tiny_store):
    store = TokenStore(tiny_store)
    tok = get_tokenizer()
    rows = [json.loads(line) for line in (tiny_store.parent / "corpus" / "code_python" / "valid.jsonl")
            .read_text().splitlines()]
    ds = store.dataset("code_python", "valid")
    assert len(rows) == len(ds)
    assert tok.decode(ds[0][:-1]) == rows[0]["text"]
    stats = json.loads((tiny_store.parent / "corpus" / "stats.json").read_text())
    assert stats["domains"]["code_python"]["valid"]["tokens"] == ds.num_tokens


def test_domains_are_different(tiny_store):
    """The domains really differ: their unigram distributions are far apart."""
    store = TokenStore(tiny_store)
    hist = {d: np.bincount(np.asarray(store.dataset(d).tokens), minlength=50257) for d in store.domains}
    p = {d: h / h.sum() for d, h in hist.items()}
    a, b = p["code_python"], p["legal"]
    tv = 0.5 * np.abs(a - b).sum()
    assert tv > 0.4


def test_errors(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    with pytest.raises(KeyError, match="unknown domain"):
        store.dataset("nope")
    with pytest.raises(ValueError, match="split"):
        store.dataset("legal", "test")
    with pytest.raises(FileNotFoundError, match="megamix data build"):
        TokenStore(tmp_path)


# ----------------------------------------------------------------------------- manifests under concurrency
def _import_one(data_dir, name, barrier):
    from megamix.data.importer import import_text_domain

    src = data_dir.parent / f"{name}.jsonl"
    barrier.wait()  # all six start together
    import_text_domain(data_dir, name, src, valid_fraction=0.2, progress=False)


def test_six_concurrent_imports_lose_nothing(tmp_path):
    """Six processes import one domain each into the same data dir at the same moment: every domain's
    record, the derived tokens/manifest.json and corpus/stats.json hold all six, with the right counts."""
    import multiprocessing as mp

    names = [f"dom{i}" for i in range(6)]
    data_dir = tmp_path / "data"
    for k, name in enumerate(names):
        rows = [{"text": f"{name} document {j}: " + "lorem ipsum dolor sit amet " * (3 + (j + k) % 7)}
                for j in range(12 + 5 * k)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    get_tokenizer()  # loaded once here; the forked children share it
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_import_one, args=(data_dir, n, barrier)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    store = TokenStore(data_dir / "tokens")  # also checks each record against its .bin/.idx
    assert store.domains == names
    view = json.loads((data_dir / "tokens" / "manifest.json").read_text())
    assert sorted(view["domains"]) == names
    stats = json.loads((data_dir / "corpus" / "stats.json").read_text())["domains"]
    assert sorted(stats) == names
    for n in names:
        ds = store.dataset(n)
        assert view["domains"][n]["train_tokens"] == ds.num_tokens == store.num_tokens(n)
        assert stats[n]["train"]["tokens"] == ds.num_tokens and stats[n]["train"]["docs"] == len(ds)
    # the natural weights come from complete counts
    nat = np.asarray(store.natural_sizes())
    assert np.allclose(nat, [store.dataset(n).num_tokens for n in names])


def test_stale_or_broken_records_are_clear_errors(tiny_store, tmp_path):
    import shutil

    from megamix.data.errors import DataError

    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_store, tokens)
    rec_path = tokens / "legal" / "manifest.json"
    rec = json.loads(rec_path.read_text())
    rec["train_tokens"] += 5
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(DataError, match=r"legal/train.bin/.idx hold .* tokens but .*legal/manifest.json records "
                                        r".*stale.*--domains legal --force"):
        TokenStore(tokens)
    rec["train_tokens"] -= 5
    rec_path.write_text(json.dumps(rec))
    TokenStore(tokens)
    # files replaced behind the record's back (e.g. another build interrupted between files and record)
    shutil.copyfile(tokens / "manpages" / "train.idx", tokens / "legal" / "train.idx")
    shutil.copyfile(tokens / "manpages" / "train.bin", tokens / "legal" / "train.bin")
    with pytest.raises(DataError, match="stale"):
        TokenStore(tokens)
    (tokens / "legal" / "train.bin").unlink()
    with pytest.raises(DataError, match=r"legal/train.bin is missing"):
        TokenStore(tokens)
    rec_path.write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenStore(tokens)


def test_v01_store_stays_readable_and_extensible(tiny_store, tmp_path):
    """A v0.1 store (only tokens/manifest.json) opens unchanged; importing a domain into it adds a record and
    keeps the old entries in the derived view."""
    import shutil

    from megamix.data.importer import import_text_domain
    from megamix.loader.testing import build_synthetic_store

    synth = TokenStore(build_synthetic_store(tmp_path / "s", {"a": 3000, "b": 2000}, valid_tokens=500))
    assert synth.domains == ["a", "b"] and synth.num_tokens("a") == 3000 and synth.vocab_size == 50257
    assert synth.manifest["dtype"] == "uint16" and synth.manifest["tokenizer"] == "synthetic"
    # the tiny store as megamix 0.1 wrote it: one manifest.json, no per-domain records
    shutil.copytree(tiny_store.parent / "corpus", tmp_path / "d" / "corpus")
    tokens = tmp_path / "d" / "tokens"
    shutil.copytree(tiny_store, tokens)
    view = json.loads((tokens / "manifest.json").read_text())
    keep = ("train_docs", "train_tokens", "valid_docs", "valid_tokens", "corpus_sha256")
    old = {"tokenizer": "gpt2", "vocab_size": 50257, "eos_id": 50256, "dtype": "uint16",
           "domains": {n: {k: e[k] for k in keep} for n, e in view["domains"].items()}}
    for f in tokens.glob("*/manifest.json"):
        f.unlink()
    (tokens / "manifest.json").write_text(json.dumps(old))
    assert TokenStore(tokens).domains == sorted(old["domains"])
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"text number {i} " * 6}) for i in range(10)))
    import_text_domain(tmp_path / "d", "c", tmp_path / "c.jsonl", progress=False, valid_fraction=0.2)
    store = TokenStore(tokens)
    assert store.domains == sorted([*old["domains"], "c"])
    assert store.num_tokens("legal") == old["domains"]["legal"]["train_tokens"]
    view = json.loads((tokens / "manifest.json").read_text())
    assert view["domains"]["legal"]["train_tokens"] == old["domains"]["legal"]["train_tokens"]
    assert "record" not in view["domains"]["legal"] and view["domains"]["c"]["record"] == "c/manifest.json"
    assert not (tokens / "legal" / "manifest.json").exists()  # nothing of the old store was rewritten

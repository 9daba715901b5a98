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

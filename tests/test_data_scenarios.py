"""Known-answer data (megamix.data.scenarios): junk, repeated-document and target views of a store, deterministic
from a seed, linked to the base files, reused when current and rebuilt when stale."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megamix.data.errors import DataError


@pytest.fixture()
def base(tiny_store, tmp_path):
    """A private copy of the tiny store (the builders write next to it)."""
    root = tmp_path / "base"
    shutil.copytree(tiny_store, root / "tokens")
    return root


def _tokens(data_dir, domain, split):
    from megamix.data.token_store import IndexedTokenDataset

    return IndexedTokenDataset(data_dir / "tokens" / domain / split)


def test_junk_domain_is_uniform_noise_shaped_like_the_median_domain(base):
    from megamix.data.manifest import load_manifest
    from megamix.data.scenarios import JUNK, build_junk_store, median_domain
    from megamix.data.store import TokenStore

    view = build_junk_store(base, seed=3)
    man = load_manifest(base / "tokens")
    store = TokenStore(view / "tokens")
    assert store.domains == sorted(list(man["domains"]) + [JUNK])
    shape = median_domain(man)
    eos, vocab = man["eos_id"], man["vocab_size"]
    for split in ("train", "valid"):
        junk, ref = _tokens(view, JUNK, split), _tokens(base, shape, split)
        assert np.array_equal(junk.doc_lengths, ref.doc_lengths)
        ids = np.asarray(junk.tokens).astype(np.int64)
        ends = junk.doc_offsets[1:] - 1
        assert (ids[ends] == eos).all() and (np.delete(ids, ends) != eos).all() and ids.max() < vocab
    body = np.delete(np.asarray(_tokens(view, JUNK, "train").tokens), _tokens(view, JUNK, "train").doc_offsets[1:] - 1)
    counts = np.bincount(body.astype(np.int64), minlength=vocab)
    assert body.size / vocab > 0.3 and counts.max() < 20      # spread over the vocabulary, no id dominates
    for d in man["domains"]:                                  # real domains: the base files themselves
        for split in ("train", "valid"):
            assert (view / "tokens" / d / f"{split}.bin").samefile(base / "tokens" / d / f"{split}.bin")
    rec = json.loads((view / "scenario.json").read_text())
    assert rec["junk"]["lengths_from"] == shape and rec["junk"]["floor_nats"] == pytest.approx(np.log(vocab - 1))


def test_junk_is_deterministic_reused_and_rebuilt_when_stale(base, tmp_path):
    from megamix.data.scenarios import JUNK, build_junk_store

    view = build_junk_store(base, seed=3)
    junk = view / "tokens" / JUNK / "train.bin"
    first, mtime = junk.read_bytes(), junk.stat().st_mtime_ns
    assert build_junk_store(base, seed=3) == view and junk.stat().st_mtime_ns == mtime      # reused
    other = tmp_path / "other"
    shutil.copytree(base / "tokens", other / "tokens")
    assert (build_junk_store(other, seed=3) / "tokens" / JUNK / "train.bin").read_bytes() == first
    assert junk.exists() and build_junk_store(base, seed=4) == view                           # other seed
    assert junk.read_bytes() != first
    (view / "scenario.json").unlink()                                                         # not ours
    with pytest.raises(DataError, match="not a scenario view"):
        build_junk_store(base, seed=4)


def test_repeat_replaces_one_train_split_with_one_document(base):
    from megamix.data.scenarios import build_repeat_store
    from megamix.data.store import TokenStore

    view = build_repeat_store(base, "legal", seed=1)
    store = TokenStore(view / "tokens")
    orig, rep = _tokens(base, "legal", "train"), _tokens(view, "legal", "train")
    rec = json.loads((view / "scenario.json").read_text())["repeat"]
    doc = np.asarray(orig[rec["document"]])
    assert len(rep) == rec["copies"] >= 2 and all(np.array_equal(rep[i], doc) for i in range(len(rep)))
    assert orig.num_tokens <= rep.num_tokens < orig.num_tokens + len(doc)
    assert (view / "tokens" / "legal" / "valid.bin").samefile(base / "tokens" / "legal" / "valid.bin")
    assert store.domains == TokenStore(base / "tokens").domains
    with pytest.raises(DataError, match="--repeat-domain 'nope' is not in"):
        build_repeat_store(base, "nope")


def test_target_trains_without_the_target_and_evaluates_on_it_alone(base):
    from megamix.data.scenarios import build_target_stores
    from megamix.data.store import TokenStore

    view, ev = build_target_stores(base, "manpages")
    train = TokenStore(view / "tokens")
    assert "manpages" not in train.domains and len(train.domains) == 3
    for d in train.domains:      # held-out gradients come from the target's train split, never trained on
        assert (view / "tokens" / d / "valid.bin").samefile(base / "tokens" / "manpages" / "train.bin")
        assert (view / "tokens" / d / "train.bin").samefile(base / "tokens" / d / "train.bin")
    evs = TokenStore(ev / "tokens")
    assert evs.domains == ["manpages"]
    assert (ev / "tokens" / "manpages" / "valid.bin").samefile(base / "tokens" / "manpages" / "valid.bin")

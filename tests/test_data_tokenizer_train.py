"""`megamix data tokenizer` (megamix.data.tokenizer_train): a byte-level BPE trained on the train split only, a new
store tokenized with it, reuse on a second run, and one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megamix.data.errors import DataError


@pytest.fixture(scope="module")
def bpe_store(tiny_store, tmp_path_factory):
    from megamix.data.tokenizer_train import build_tokenized_store

    out = tmp_path_factory.mktemp("bpe") / "data_512"
    man = build_tokenized_store(tiny_store.parent, out, vocab_size=512, progress=False)
    return out, man


def test_trains_a_byte_level_bpe_on_the_train_split_and_tokenizes_a_new_store(tiny_store, bpe_store):
    from megamix.data.store import TokenStore
    from megamix.data.tokenize import file_sha256
    from megamix.data.tokenizer import load_tokenizer
    from megamix.data.tokenizer_train import EOS_TOKEN, RECORD

    out, man = bpe_store
    src = tiny_store.parent
    rec = json.loads((out / "tokenizer" / RECORD).read_text())
    assert rec["split"] == "train" and rec["vocab_size"] == 512 and rec["trained_vocab_size"] == 512
    # what it was trained on: exactly the train files of the source corpus
    assert rec["train_sha256"] == {d: file_sha256(src / "corpus" / d / "train.jsonl") for d in rec["domains"]}
    tok = load_tokenizer(str(out / "tokenizer"))
    assert len(tok) == 512 and tok.eos_token == EOS_TOKEN and tok.eos_token_id == 0
    text = "def f(x):\n    return x  # naïve ünïcode\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text      # byte-level: lossless
    assert man["vocab_size"] == 512 and man["eos_id"] == 0 and man["dtype"] == "uint16"
    assert man["tokenizer"] == str((out / "tokenizer").resolve())
    store = TokenStore(out / "tokens")
    assert store.domains == TokenStore(tiny_store).domains
    for d in store.domains:
        ids = np.asarray(store.dataset(d, "train").tokens)
        assert ids.max() < 512 and ids[-1] == 0
    # the source store is untouched, and the new corpus is its own (links to the same jsonl)
    assert json.loads((tiny_store / "manifest.json").read_text())["vocab_size"] == 50257
    stats = json.loads((out / "corpus" / "stats.json").read_text())
    assert all(e["train"]["tokens"] == man["domains"][d]["train_tokens"] for d, e in stats["domains"].items())


def test_second_run_reuses_everything_and_a_different_vocab_is_refused(tiny_store, bpe_store):
    from megamix.data.tokenizer_train import build_tokenized_store, train_bpe_tokenizer

    out, _ = bpe_store
    files = [out / "tokenizer" / "tokenizer.json"] + sorted((out / "tokens").rglob("*.bin"))
    before = [f.stat().st_mtime_ns for f in files]
    build_tokenized_store(tiny_store.parent, out, vocab_size=512, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == before
    with pytest.raises(DataError, match="trained differently .*vocab_size.*--force"):
        train_bpe_tokenizer(tiny_store.parent, out / "tokenizer", 600, progress=False)


def test_training_is_deterministic(tiny_store, bpe_store, tmp_path):
    from megamix.data.tokenizer_train import train_bpe_tokenizer

    out, _ = bpe_store
    again = train_bpe_tokenizer(tiny_store.parent, tmp_path / "again", 512, progress=False)
    a = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]
    b = json.loads((again / "tokenizer.json").read_text())["model"]
    assert a["vocab"] == b["vocab"] and a["merges"] == b["merges"]


def test_existing_tokenizer_folder_tokenizes_another_corpus_the_same_way(tiny_store, bpe_store, tmp_path):
    from megamix.data.tokenizer_train import build_tokenized_store

    out, man = bpe_store
    part = tmp_path / "part"
    shutil.copytree(tiny_store.parent / "corpus", part / "corpus")
    man2 = build_tokenized_store(part, tmp_path / "part_512", tokenizer=str(out / "tokenizer"),
                                 domains=["legal"], progress=False)
    assert list(man2["domains"]) == ["legal"] and man2["tokenizer"] == man["tokenizer"]
    assert man2["domains"]["legal"]["train_tokens"] == man["domains"]["legal"]["train_tokens"]


@pytest.mark.parametrize("argv, msg", [
    (["--vocab", "100"], "needs 512 to 65500 ids"),
    ([], "exactly one of --vocab"),
    (["--vocab", "512", "--same-out"], "must be a new data dir, not --data-dir itself"),
])
def test_cli_errors_are_one_line(tiny_store, tmp_path, capsys, argv, msg):
    from megamix.cli import main

    src = tiny_store.parent
    out = src if "--same-out" in argv else tmp_path / "o"
    argv = [a for a in argv if a != "--same-out"]
    assert main(["data", "tokenizer", "--data-dir", str(src), "--out", str(out), *argv]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and msg in lines[0], lines
    assert out == src or not Path(out).exists()

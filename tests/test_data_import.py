"""`megamix data import`: jsonl, parquet, HF save_to_disk and Megatron stores, plus error cases."""
import json

import numpy as np
import pytest

from megamix.data.importer import DataImportError, import_megatron_domain, import_text_domain
from megamix.data.store import TokenStore
from megamix.data.token_store import write_documents
from megamix.data.tokenizer import get_tokenizer

TEXTS = [f"Record {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(60)]


def _check_domain(data_dir, domain, n_docs):
    store = TokenStore(data_dir / "tokens")
    assert domain in store.domains
    tr, va = store.dataset(domain, "train"), store.dataset(domain, "valid")
    assert len(tr) + len(va) == n_docs and len(va) >= 1
    tok = get_tokenizer()
    corpus = [json.loads(x)["text"] for x in (data_dir / "corpus" / domain / "train.jsonl").read_text().splitlines()]
    assert tok.decode(tr[0][:-1]) == corpus[0] and tr[0][-1] == 50256
    stats = json.loads((data_dir / "corpus" / "stats.json").read_text())["domains"][domain]
    assert stats["train"]["tokens"] == tr.num_tokens and stats["provenance"]["source_paths"]
    return store


def test_import_jsonl(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"body": t, "id": i} for i, t in enumerate(TEXTS)] + [{"body": TEXTS[0], "id": 99}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    e = import_text_domain(tmp_path / "d", "mine", src, text_field="body", valid_fraction=0.2, progress=False)
    assert e["duplicates_dropped"] == 1
    _check_domain(tmp_path / "d", "mine", len(TEXTS))


def test_import_parquet_and_hf(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), tmp_path / "in.parquet")
    import_text_domain(tmp_path / "d", "pq", tmp_path / "in.parquet", progress=False, valid_fraction=0.2)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": TEXTS[:30]})}) \
        .save_to_disk(str(tmp_path / "hfds"))
    import_text_domain(tmp_path / "d", "hf", tmp_path / "hfds", text_field="content", progress=False,
                       valid_fraction=0.2)  # format detected from dataset_dict.json
    store = _check_domain(tmp_path / "d", "pq", len(TEXTS))
    _check_domain(tmp_path / "d", "hf", 30)
    assert store.domains == ["hf", "pq"]


def test_import_megatron(tmp_path):
    tok = get_tokenizer()
    docs = [tok(t)["input_ids"] + [50256] for t in TEXTS[:20]] + [[50256], []]  # empty docs are dropped
    write_documents(tmp_path / "mega_text_document", docs, np.int32)
    e = import_megatron_domain(tmp_path / "d", "mega", tmp_path / "mega_text_document", valid_fraction=0.2,
                               progress=False)
    assert e["train"]["docs"] + e["valid"]["docs"] == 20
    store = _check_domain(tmp_path / "d", "mega", 20)
    all_docs = sorted(d.tolist() for sp in ("train", "valid") for d in store.dataset("mega", sp))
    assert all_docs == sorted(docs[:20])  # ids preserved exactly, one EOS each
    assert store.dataset("mega").dtype is np.uint16


def test_import_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataImportError, match="empty"):
        import_text_domain(tmp_path / "d", "x", tmp_path / "empty.jsonl", progress=False)
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "hello there world"}) + "\n")
    with pytest.raises(DataImportError, match="no text field 'text'.*body"):
        import_text_domain(tmp_path / "d", "x", tmp_path / "nofield.jsonl", progress=False)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataImportError, match="not valid JSON"):
        import_text_domain(tmp_path / "d", "x", tmp_path / "bad.jsonl", progress=False)
    with pytest.raises(DataImportError, match="does not exist"):
        import_text_domain(tmp_path / "d", "x", tmp_path / "nope.jsonl", progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["abc def ghi jkl mno"]}), tmp_path / "p.parquet")
    with pytest.raises(DataImportError, match="no column 'text'"):
        import_text_domain(tmp_path / "d", "x", tmp_path / "p.parquet", progress=False)
    # Megatron: vocab mismatch, declared or detected from the ids
    write_documents(tmp_path / "big", [[1, 2, 3], [60000, 5]], np.int32)
    with pytest.raises(DataImportError, match="vocab-size mismatch"):
        import_megatron_domain(tmp_path / "d", "m", tmp_path / "big", progress=False)
    write_documents(tmp_path / "ok", [[1, 2, 3], [4, 5]], np.uint16)
    with pytest.raises(DataImportError, match="vocab-size mismatch.*32000"):
        import_megatron_domain(tmp_path / "d", "m", tmp_path / "ok", vocab_size=32000, progress=False)
    write_documents(tmp_path / "none", [], np.uint16)
    with pytest.raises(DataImportError, match="empty"):
        import_megatron_domain(tmp_path / "d", "m", tmp_path / "none", progress=False)
    with pytest.raises(DataImportError, match="cannot read"):
        import_megatron_domain(tmp_path / "d", "m", tmp_path / "missing", progress=False)
    assert not (tmp_path / "d" / "tokens" / "m").exists() or not any((tmp_path / "d" / "tokens" / "m").iterdir())


def test_import_datasetdict_keeps_its_validation_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:40]}),
                               "validation": datasets.Dataset.from_dict({"text": TEXTS[40:46] + [TEXTS[0]]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    e = import_text_domain(tmp_path / "d", "hf", tmp_path / "dd", progress=False, valid_fraction=0.3)
    assert e["provenance"]["validation_split"] == "validation"
    valid = [json.loads(x)["text"] for x in (tmp_path / "d/corpus/hf/valid.jsonl").read_text().splitlines()]
    train = [json.loads(x)["text"] for x in (tmp_path / "d/corpus/hf/train.jsonl").read_text().splitlines()]
    assert valid == TEXTS[40:46] + [TEXTS[0]]          # exactly its own split, not a re-split of train
    assert train == TEXTS[1:40] and e["duplicates_dropped"] == 1  # TEXTS[0] is held out, not leaked
    store = TokenStore(tmp_path / "d" / "tokens")
    assert store.num_docs("hf", "valid") == 7 and store.num_docs("hf", "train") == 39


def test_import_megatron_with_another_tokenizer(tmp_path, wide_tokenizer):
    """Megatron files of a >65,500-id tokenizer import as they are (int32), with no GPT-2 restriction."""
    from megamix.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(wide_tokenizer))
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [1] for t in TEXTS[:20]]
    docs[3] = docs[3][:-1] + [65990, 1]                 # an id only an int32 store can hold
    write_documents(tmp_path / "wide_text_document", docs, np.int32)
    e = import_megatron_domain(tmp_path / "d", "wide", tmp_path / "wide_text_document", valid_fraction=0.2,
                               progress=False, tokenizer=str(wide_tokenizer), vocab_size=66000)
    assert e["train"]["docs"] + e["valid"]["docs"] == 20
    store = TokenStore(tmp_path / "d" / "tokens")
    assert store.vocab_size == 66000 and store.dataset("wide").dtype is np.int32 and store.eos_id == 1
    got = sorted(d.tolist() for sp in ("train", "valid") for d in store.dataset("wide", sp))
    assert got == sorted(docs) and store.max_token_id == 65990
    with pytest.raises(DataImportError, match="vocab-size mismatch.*32000"):
        import_megatron_domain(tmp_path / "d", "w2", tmp_path / "wide_text_document", vocab_size=32000,
                               progress=False, tokenizer=str(wide_tokenizer))

"""End to end: the one training loop trains the tiny config on data used in place (data.paths): a Megatron
blend written by megatron-core's own IndexedDatasetBuilder (int32, a 66,000-id tokenizer) and a tokenised
Hugging Face Arrow DatasetDict."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megamix.config import MegamixConfig

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32", "train.global_batch_size=4",
        "train.micro_batch_size=4", "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=1",
        "train.threads=1", "projection.k1=4", "projection.k2=4", "train.steps=2", "train.eval_every=0",
        "mixing.strategy=rnb", "mixing.update_every=1"]


def _texts(pattern_root: Path, glob: str, n: int, chars: int = 3000) -> list[str]:
    out = []
    for f in sorted(pattern_root.glob(glob)):
        try:
            t = f.read_text(encoding="utf-8", errors="replace")[:chars]
        except OSError:
            continue
        if len(t) > 500:
            out.append(t)
        if len(out) == n:
            break
    return out


def _cfg(tmp_path, *extra) -> MegamixConfig:
    return MegamixConfig.from_yaml(None, [f"train.out_dir={tmp_path / 'run'}", *TINY, *extra]).validate()


def test_train_on_megatron_int32_blend_in_place(tmp_path, wide_tokenizer):
    torch = pytest.importorskip("torch")
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    from megamix.data.tokenizer import load_tokenizer, tokenizer_meta
    from megamix.train.loop import train

    meta = tokenizer_meta(str(wide_tokenizer))
    assert meta["vocab_size"] > 65500 and meta["dtype"] == "int32"
    tok = load_tokenizer(str(wide_tokenizer))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpora = {"py_text_document": _texts(stdlib / "json", "*.py", 8) + _texts(stdlib / "email", "*.py", 8),
               "lic_text_document": _texts(Path("/usr/share/common-licenses"), "*", 12)}
    top = 0
    for name, texts in corpora.items():   # Megatron's preprocess_data.py with --append-eod, by hand
        assert len(texts) >= 6, f"not enough local text for {name}"
        b = mi.IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=mi.DType.optimal_dtype(meta["vocab_size"]))
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"] + [meta["eos_id"]]
            top = max(top, max(ids))
            b.add_document(torch.tensor(ids), [len(ids)])
        b.finalize(str(tmp_path / f"{name}.idx"))
    assert (tmp_path / "py_text_document.idx").read_bytes()[17] == 4  # Megatron's code for int32
    assert top > 65535, "the blend must hold ids beyond uint16"
    blend = f"data.paths=[0.3, {tmp_path / 'py_text_document'}, 0.7, {tmp_path / 'lic_text_document'}]"
    cfg = _cfg(tmp_path, blend, f"data.tokenizer={wide_tokenizer}", f"model.vocab_size={meta['vocab_size']}")
    res = train(cfg, progress=False, log_to_stdout=False)
    assert res.steps == 2 and np.isfinite(res.train_loss) and set(res.valid_loss) == {"py", "lic"}
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    w0 = next(r for r in recs if r["kind"] == "weights" and r["step"] == 0)["weights"]
    assert w0 == pytest.approx({"py": 0.3, "lic": 0.7})      # the blend's weights are the natural prior
    man = json.loads((tmp_path / "run" / "data_manifest.json").read_text())
    assert man["vocab_size"] == meta["vocab_size"] and man["domains"]["py"]["holdout"]["documents"] >= 1
    assert man["domains"]["lic"]["dtypes"] == ["int32"] and man["domains"]["py"]["train_max_token_id"] <= top
    # the same blend with a model vocabulary below the data's is a one-line error (exit 2) before training
    from megamix.cli import main
    sets = [f"train.out_dir={tmp_path / 'run2'}", *TINY, blend, f"data.tokenizer={wide_tokenizer}",
            "model.vocab_size=50257"]
    rc = main(["train", "--no-progress", *[w for o in sets for w in ("--set", o)]])
    assert rc == 2 and not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_train_on_arrow_dataset_in_place(tmp_path, capsys):
    import datasets

    from megamix.data.tokenizer import get_tokenizer
    from megamix.train.loop import train

    tok = get_tokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def encode(texts):
        return {"input_ids": [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]}

    for name, texts in (("code", _texts(stdlib / "json", "*.py", 8) + _texts(stdlib / "email", "*.py", 6)),
                        ("legal", _texts(Path("/usr/share/common-licenses"), "*", 12))):
        dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(encode(texts[2:])),
                                   "validation": datasets.Dataset.from_dict(encode(texts[:2]))})
        dd.save_to_disk(str(tmp_path / name))
    files = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.arrow")}
    cfg = _cfg(tmp_path, f"data.paths={{code: {tmp_path / 'code'}, legal: {tmp_path / 'legal'}}}",
               "data.tokenizer=gpt2")
    res = train(cfg, progress=False, log_to_stdout=False)
    assert res.steps == 2 and set(res.valid_loss) == {"code", "legal"}
    assert all(np.isfinite(v) for v in res.valid_loss.values())
    man = json.loads((tmp_path / "run" / "data_manifest.json").read_text())
    assert man["domains"]["code"]["valid_from"] == [f"{tmp_path / 'code'}: own validation split"]
    assert man["domains"]["code"]["valid_docs"] == 2 and man["tokenizer"] == "gpt2"
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.arrow")} == files  # nothing rewritten

"""The last ways a long run could pick the wrong state or refuse to start (issue 24's leftovers):
``model.init_from`` is read only at step 0, and ``model.vocab_size`` defaults to ``auto`` (the HF config's, else the
tokenizer's, else the store's). A skipped step on a mixing update keeping its round is in test_train_guard.py."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(data_dir: Path, out_dir: Path, *extra: str) -> MegamixConfig:
    ov = [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", "model.n_layer=1", "model.n_embd=32",
          "model.n_head=2", "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
          "train.eval_batches=1", "train.eval_every=0", "train.threads=1", "projection.k1=8", "projection.k2=4",
          "mixing.strategy=rnb", "mixing.update_every=2", *extra]
    return MegamixConfig.from_yaml(None, ov).validate()


def test_init_from_is_read_only_at_step_0(tiny_store, tmp_path):
    from megamix.train.loop import train
    from megamix.train.model import build_model

    init = tmp_path / "init"
    src_cfg = _cfg(tiny_store.parent, tmp_path / "src")
    build_model(src_cfg.model, seed=3).save_pretrained(init)
    cfg = _cfg(tiny_store.parent, tmp_path / "run", f"model.init_from={init}", "train.steps=4",
               "train.checkpoint_every=2")
    full = train(cfg, progress=False, log_to_stdout=False, stop_at_step=2)
    shutil.move(str(init), str(tmp_path / "moved"))         # the init file is gone: a resume does not need it
    res = train(cfg, progress=False, log_to_stdout=False)
    assert res.start_step == 2 and res.steps == 4
    # and the resumed run is the run that started from init_from: same as one uninterrupted run from it
    shutil.move(str(tmp_path / "moved"), str(init))
    ref = train(_cfg(tiny_store.parent, tmp_path / "ref", f"model.init_from={init}", "train.steps=4",
                     "train.checkpoint_every=2"), progress=False, log_to_stdout=False)
    assert full.step_losses + res.step_losses == ref.step_losses


def test_resume_names_the_checkpoint_its_weights_come_from(tiny_store, tmp_path):
    from megamix.train.model import build_model

    init = tmp_path / "init"
    build_model(_cfg(tiny_store.parent, tmp_path / "x").model, seed=3).save_pretrained(init)
    args = ["--set", f"data.data_dir={tiny_store.parent}", "--set", f"train.out_dir={tmp_path / 'run'}",
            "--set", f"model.init_from={init}", "--set", "train.steps=2", "--set", "train.checkpoint_every=2",
            "--no-progress"]
    base = [sys.executable, "-m", "megamix", "train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
            "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
            "--set", "model.seq_len=32", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4",
            "--set", "train.eval_batches=1", "--set", "projection.k1=8", "--set", "projection.k2=4"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(base + args, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    init.rename(tmp_path / "moved")
    again = subprocess.run(base + args[:-3] + ["--set", "train.steps=4", "--no-progress"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    line = next(x for x in again.stdout.splitlines() if x.startswith("resumed from"))
    assert "step_0000002" in line and f"model.init_from={init} is read only at step 0" in line


def test_vocab_size_auto_takes_the_tokenizer_s_and_an_explicit_value_must_fit(tiny_store, tmp_path):
    from megamix.train.preflight import check_run

    cfg = _cfg(tiny_store.parent, tmp_path / "a")
    assert cfg.model.vocab_size == "auto"
    pre = check_run(cfg)
    assert cfg.model.vocab_size == 50257
    assert "# model.vocab_size: auto: 50257 from the tokenizer of the token data (gpt2)" in pre.describe()
    padded = check_run(_cfg(tiny_store.parent, tmp_path / "b", "model.vocab_size=50304"))   # a padded vocabulary
    assert "# model.vocab_size: 50304 (model.vocab_size)" in padded.describe()
    with pytest.raises(ConfigError, match=r"model.vocab_size=50000 is smaller than the vocabulary of the token "
                                          r"data \(50257"):
        check_run(_cfg(tiny_store.parent, tmp_path / "c", "model.vocab_size=50000"))
    with pytest.raises(ConfigError, match="model.vocab_size must be auto or an integer >= 256"):
        _cfg(tiny_store.parent, tmp_path / "d", "model.vocab_size=big")


LLAMA = ("model.hf_config={model_type: llama, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
         "intermediate_size: 64, vocab_size: 70000}")


def test_vocab_size_auto_takes_the_hf_config_s_over_int32_data(tmp_path, wide_tokenizer):
    """The issue's case: a Llama hf_config with vocab_size 70000 over int32 data (a 66,000-id tokenizer) used to fail
    with "token id ... >= model.vocab_size=50257" until model.vocab_size was repeated."""
    from megamix.data.testing import build_tiny_store
    from megamix.train.loop import train

    tokens = build_tiny_store(tmp_path / "wide", ("code_python", "legal"), tokenizer=str(wide_tokenizer))
    cfg = _cfg(tokens.parent, tmp_path / "run", LLAMA, "train.steps=2", f"data.tokenizer={wide_tokenizer}")
    res = train(cfg, progress=False, log_to_stdout=False)
    assert cfg.model.vocab_size == 70000 and res.steps == 2
    assert "vocab_size: 70000" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model.hf_config has vocab_size=70000 but model.vocab_size=66000"):
        train(_cfg(tokens.parent, tmp_path / "bad", LLAMA, "model.vocab_size=66000", "train.steps=1",
                   f"data.tokenizer={wide_tokenizer}"), progress=False, log_to_stdout=False)


def test_auto_without_data_is_gpt2_s_vocabulary():
    from megamix.train.model import build_model

    m = build_model(MegamixConfig.from_yaml(None, ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]).model, 0)
    assert m.config.vocab_size == 50257 and m.get_output_embeddings().weight.shape[0] == 50257

"""megamix.train.model: any Hugging Face causal LM in the built-in trainer (model.hf_config), seeded init,
init_from, document masking of packed windows, gradient checkpointing, attention implementations, compile,
parameter counts of the shipped configs."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.train.model import (attention_mask_for, build_model, count_config_parameters, model_inputs,
                                 resolve_hf_config)

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ("model.hf_config={model_type: llama, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, "
         "num_key_value_heads: 2, intermediate_size: 64}")
QWEN2 = ("model.hf_config={model_type: qwen2, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
         "intermediate_size: 64, tie_word_embeddings: true}")


def _cfg(*extra: str) -> MegamixConfig:
    return MegamixConfig.from_yaml(None, ["model.vocab_size=512", "model.seq_len=32", "model.n_layer=1",
                                          "model.n_embd=32", "model.n_head=2", *extra]).validate()


def _train_cfg(data_dir: Path, out_dir: Path, *extra: str) -> MegamixConfig:
    ov = [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", "model.seq_len=32", "train.global_batch_size=8",
          "train.micro_batch_size=4", "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=1",
          "train.threads=1", "train.eval_every=0", "projection.k1=8", "projection.k2=4", "train.lr=0.01", *extra]
    return MegamixConfig.from_yaml(None, ov).validate()


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])


# ------------------------------------------------------------------------------------------- the trainer
def test_llama_takes_the_fused_path_and_learns(tiny_store, tmp_path):
    """An inline Llama config through the one loop: fused LM head (no logits), R&B updates, the loss goes down."""
    from megamix.train.loop import train

    cfg = _train_cfg(tiny_store.parent, tmp_path / "llama", LLAMA, "model.vocab_size=50257", "train.steps=6",
                     "mixing.strategy=rnb", "mixing.update_every=2")
    res = train(cfg, progress=False, log_to_stdout=False)
    assert res.lm_head_path == "fused"
    assert all(np.isfinite(res.step_losses)) and res.step_losses[-1] < res.step_losses[0] - 0.5
    assert len(res.weight_history) >= 2


def test_qwen2_fused_and_unsupported_class_falls_back_to_capture(tiny_store, tmp_path):
    from megamix.integrations.hf import check_supported
    from megamix.train.loop import train

    qwen = build_model(_cfg(QWEN2).model, seed=0)
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    check_supported(qwen)                     # the fused path applies to it
    neox = ("model.hf_config={model_type: gpt_neox, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
            "intermediate_size: 64}")
    cfg = _train_cfg(tiny_store.parent, tmp_path / "neox", neox, "model.vocab_size=50257", "train.steps=2",
                     "mixing.strategy=rnb", "mixing.update_every=1")
    res = train(cfg, progress=False, log_to_stdout=False)
    assert res.lm_head_path == "capture" and all(np.isfinite(res.step_losses))
    assert len(res.weight_history) >= 2       # the capture's statistics drove R&B


# ------------------------------------------------------------------------------------------- config forms
def test_seeded_init_is_deterministic_and_gpt2_default_unchanged():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = _cfg(LLAMA)
    a, b, c = build_model(cfg.model, seed=3), build_model(cfg.model, seed=3), build_model(cfg.model, seed=4)
    assert type(a).__name__ == "LlamaForCausalLM" and a.config._attn_implementation == "sdpa"
    assert torch.equal(_params(a), _params(b)) and not torch.equal(_params(a), _params(c))
    # with hf_config empty the model is exactly the GPT-2 megamix always built
    g = _cfg().model
    torch.manual_seed(7)
    old = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256))
    assert torch.equal(_params(build_model(g, seed=7)), _params(old))


def test_hf_config_folder_and_errors(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("qwen2", vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64).save_pretrained(tmp_path / "qwen")
    assert type(build_model(_cfg(f"model.hf_config={tmp_path / 'qwen'}").model, 0)).__name__ == "Qwen2ForCausalLM"
    bad = {
        f"model.hf_config={tmp_path / 'qwen'}|model.vocab_size=1024": "set model.vocab_size=512",
        f"model.hf_config={tmp_path}": "without config.json",
        "model.hf_config=./no/such/folder": "no such folder",
        "model.hf_config=megamix-test/not-cached": "local Hugging Face cache",
        "model.hf_config={model_type: llama, hiden_size: 32}": "Did you mean 'hidden_size'",
        "model.hf_config={model_type: nosuchmodel}": "not a model type",
        "model.hf_config={model_type: llama, hidden_size: 30, num_attention_heads: 4}": "multiple of the number",
        "model.hf_config={model_type: llama, max_position_embeddings: 16}": "exceeds the HF config",
        "model.hf_config={model_type: t5}": "encoder-decoder",
    }
    for over, msg in bad.items():
        with pytest.raises(ConfigError, match=re.escape(msg)):
            resolve_hf_config(_cfg(*over.split("|")).model)
    with pytest.raises(ConfigError, match="needs model_type"):
        _cfg("model.hf_config={hidden_size: 32}")
    with pytest.raises(ConfigError, match="attn_implementation must be one of"):
        _cfg("model.attn_implementation=flash")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            build_model(_cfg(LLAMA, "model.attn_implementation=flash_attention_2").model, 0)


def test_hf_config_name_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    """A config name is looked up in the Hugging Face cache, offline (HF_HUB_OFFLINE=1): a cached one builds."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--megamix-test--tiny-llama"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "intermediate_size": 64}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    n = count_config_parameters(_cfg("model.hf_config=megamix-test/tiny-llama").model)
    assert n["class"] == "LlamaForCausalLM" and n["total"] == 43104
    with pytest.raises(ConfigError, match="nor a config in the local Hugging Face cache"):
        resolve_hf_config(_cfg("model.hf_config=megamix-test/other").model)


# ------------------------------------------------------------------------------------------- init_from
def test_init_from_hf_folder_and_megamix_checkpoint(tmp_path):
    from megamix.train.backend import PlainBackend
    from megamix.train.optim import build_optimizer

    cfg = _cfg(LLAMA)
    src = build_model(cfg.model, seed=1)
    src.save_pretrained(tmp_path / "hf")
    init = MegamixConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                               "init_from": str(tmp_path / "hf")}})
    assert torch.equal(_params(build_model(init.model, seed=2)), _params(src))
    # tied GPT-2: save_pretrained stores the tied matrix once
    gpt = build_model(_cfg().model, seed=1)
    gpt.save_pretrained(tmp_path / "gpt")
    assert torch.equal(_params(build_model(_cfg(f"model.init_from={tmp_path / 'gpt'}").model, 5)), _params(gpt))
    # a megamix plain-backend checkpoint (the folder or its model.pt)
    backend = PlainBackend()
    backend.setup(src, build_optimizer(src, cfg), lambda s: 1e-3, cfg)
    (tmp_path / "ck" / "step_0000001").mkdir(parents=True)
    backend.save(tmp_path / "ck", "step_0000001")
    for path in (tmp_path / "ck" / "step_0000001", tmp_path / "ck" / "step_0000001" / "model.pt"):
        m = build_model(_cfg(LLAMA, f"model.init_from={path}").model, seed=9)
        assert torch.equal(_params(m), _params(src))
    # shape mismatch: one clear line naming a tensor and both shapes
    wide = LLAMA.replace("intermediate_size: 64", "intermediate_size: 96")
    with pytest.raises(ConfigError, match=r"differ in shape, e\.g\. .*mlp.* \[64, 32\] in the checkpoint vs \[96, 32\]"):
        build_model(_cfg(wide, f"model.init_from={tmp_path / 'hf'}").model, 0)
    with pytest.raises(ConfigError, match="tensor\\(s\\) of the model are missing"):
        build_model(_cfg(f"model.init_from={tmp_path / 'hf'}").model, 0)     # a GPT-2 from Llama weights
    with pytest.raises(ConfigError, match="no weights found"):
        build_model(_cfg(LLAMA, f"model.init_from={tmp_path / 'ck'}").model, 0)


# ------------------------------------------------------------------------------------------- doc masking
def _packed(a: torch.Tensor, b: torch.Tensor):
    """A window holding document a then document b, as the loader lays it out."""
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    seg = torch.cat([torch.zeros(len(a), dtype=torch.long), torch.ones(len(b), dtype=torch.long)])[None]
    return SimpleNamespace(input_ids=ids, position_ids=pos, segment_ids=seg)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_logits_do_not_depend_on_the_preceding_document(arch, attn):
    """With model.doc_masking a document's logits are the same whether or not another document precedes it in
    the window; with it off they differ (the window attends across the boundary)."""
    model = build_model(_cfg(*([LLAMA] if arch == "llama" else []), f"model.attn_implementation={attn}").model, 0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 512, (11,), generator=g), torch.randint(0, 512, (21,), generator=g)
    packed, alone = _packed(a, b), _packed(b[:0], b)

    def logits(batch, masking):
        with torch.no_grad():
            return model(**model_inputs(batch, model, masking, "cpu"), use_cache=False).logits[0, -len(b):]

    ref = logits(alone, True)
    torch.testing.assert_close(logits(packed, True), ref, rtol=1e-5, atol=1e-5)
    assert (logits(packed, False) - ref).abs().max() > 1e-3
    mask = attention_mask_for(packed.segment_ids, model, True)
    assert mask.shape == (1, 1, 32, 32) and mask.dtype == (torch.bool if attn == "sdpa" else torch.float32)
    assert attention_mask_for(alone.segment_ids, model, True) is None        # one document: the causal kernel


def test_doc_masking_reaches_the_trainer(tiny_store, tmp_path):
    """The loop's forwards carry the mask: the same run with model.doc_masking=false trains differently."""
    from megamix.train.loop import train

    runs = [train(_train_cfg(tiny_store.parent, tmp_path / str(m), LLAMA, "model.vocab_size=50257", "train.steps=1",
                             f"model.doc_masking={m}"), progress=False, log_to_stdout=False) for m in (True, False)]
    assert runs[0].step_losses[0] != runs[1].step_losses[0]


# ------------------------------------------------------------------------------------------- memory / speed
def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = _cfg(LLAMA)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for gc in (False, True):
        model = build_model(MegamixConfig.from_dict({**cfg.to_dict(), "model": {
            **cfg.to_dict()["model"], "gradient_checkpointing": gc}}).model, seed=0)
        model.train()
        assert model.is_gradient_checkpointing == gc
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_body_keeps_the_fused_head(tiny_store, tmp_path):
    """model.compile compiles the body in place (cold compile on CPU takes about a minute): the fused head
    still runs and the losses match the eager model."""
    from megamix.train.loop import train

    res = [train(_train_cfg(tiny_store.parent, tmp_path / str(c), LLAMA, "model.vocab_size=50257", "train.steps=2",
                            f"model.compile={c}", "model.doc_masking=false"), progress=False, log_to_stdout=False)
           for c in (False, True)]
    assert res[1].lm_head_path == "fused"
    np.testing.assert_allclose(res[1].step_losses, res[0].step_losses, rtol=1e-4)


# ------------------------------------------------------------------------------------------- shipped configs
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_validates_and_states_its_parameter_count(path, capsys):
    """Every shipped config loads and validates (`megamix config`); a config that states its parameter count in
    a `# parameters:` comment has exactly that many (counted on the meta device, nothing allocated)."""
    from megamix.cli import main

    assert main(["config", "--config", str(ROOT / path)]) == 0
    capsys.readouterr()
    text = (ROOT / path).read_text()
    stated = re.search(r"^# parameters: ([\d,]+) total, ([\d,]+) non-embedding", text, flags=re.M)
    if path.startswith("configs/llama-"):
        assert stated, f"{path} must state its parameter count"
    if stated:
        n = count_config_parameters(MegamixConfig.from_yaml(ROOT / path).model)
        assert (n["total"], n["non_embedding"]) == tuple(int(x.replace(",", "")) for x in stated.groups())


@pytest.mark.parametrize("path,world,cls,lo,hi", [("configs/llama-125m.yaml", 8, "LlamaForCausalLM", 115e6, 135e6),
                                                   ("configs/llama-1b.yaml", 16, "LlamaForCausalLM", 1.1e9, 1.3e9)])
def test_llama_configs_launch_geometry(path, world, cls, lo, hi):
    from megamix.integrations.deepspeed import validate_launch

    cfg = MegamixConfig.from_yaml(ROOT / path)
    assert validate_launch(cfg, world, check_devices=False)["gradient_accumulation_steps"] >= 1
    n = count_config_parameters(cfg.model)
    assert n["class"] == cls and lo < n["total"] < hi

"""megamix.train.optim: train.optimizer (adamw | fused_adam | apex_fused_adam | auto), clear errors where one cannot
run, and the DeepSpeed cases (the ds_config's own optimizer section, ZeRO-Offload)."""
from __future__ import annotations

import json

import pytest
import torch

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.train.optim import DS_CONFIG, DS_CPU_ADAM, build_optimizer, param_groups, resolve_optimizer


def _cfg(*extra: str) -> MegamixConfig:
    return MegamixConfig.from_yaml(None, ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32",
                                          "model.vocab_size=512", *extra]).validate()


def _model():
    from megamix.train.model import build_model

    return build_model(_cfg().model, seed=0)


def test_adamw_is_the_default_with_decay_on_matrices_only():
    model = _model()
    for choice in ("auto", "adamw"):
        opt = build_optimizer(model, _cfg(f"train.optimizer={choice}", "train.weight_decay=0.05"))
        assert type(opt) is torch.optim.AdamW
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8 and decay["lr"] == 0.003
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(p.dim() >= 2 and "wpe" not in names[id(p)] for p in decay["params"])
        assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.wpe.weight", "transformer.ln_f.weight"}
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(list(model.parameters()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_fused_optimizers_need_a_gpu():
    with pytest.raises(ConfigError, match="train.optimizer=fused_adam is a CUDA kernel .* use train.optimizer=adamw"):
        resolve_optimizer(_cfg("train.optimizer=fused_adam"))
    with pytest.raises(ConfigError, match="train.optimizer=apex_fused_adam is a CUDA kernel"):
        build_optimizer(_model(), _cfg("train.optimizer=apex_fused_adam"))
    # the plain backend's dry run checks it too
    from megamix.train.backend import PlainBackend

    with pytest.raises(ConfigError, match="CUDA kernel"):
        PlainBackend().check(_cfg("train.optimizer=fused_adam"))
    with pytest.raises(ConfigError, match="train.optimizer must be one of auto, adamw, fused_adam, apex_fused_adam"):
        _cfg("train.optimizer=lamb")


def test_apex_must_be_nvidias(monkeypatch, tmp_path):
    """With a GPU (pretended), apex_fused_adam still needs the real NVIDIA apex: PyPI's 'apex' is refused with
    the reason."""
    pkg = tmp_path / "apex"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import views\n")
    (pkg / "views.py").write_text("def login(request):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in list(__import__("sys").modules) if n == "apex" or n.startswith("apex.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    with pytest.raises(ConfigError, match="apex_fused_adam: 'apex' is importable but is not NVIDIA apex"):
        resolve_optimizer(_cfg("train.optimizer=apex_fused_adam"), cuda=True)


def test_deepspeed_optimizer_section_and_offload(tmp_path):
    pytest.importorskip("deepspeed")
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    ds = ("deepspeed.enabled=true", f"deepspeed.config={tmp_path / 'ds.json'}")
    assert resolve_optimizer(_cfg(*ds)) == DS_CONFIG
    assert build_optimizer(_model(), _cfg(*ds)) is None          # DeepSpeed builds it from the section
    with pytest.raises(ConfigError, match="train.optimizer=adamw but deepspeed.config .* has an optimizer section"):
        resolve_optimizer(_cfg(*ds, "train.optimizer=adamw"))
    # ZeRO-Offload runs only DeepSpeed's CPU Adam (DeepSpeed refuses a torch optimizer there)
    off = ("deepspeed.enabled=true", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true")
    assert resolve_optimizer(_cfg(*off)) == DS_CPU_ADAM
    with pytest.raises(ConfigError, match="ZeRO-Offload .* set train.optimizer=auto"):
        resolve_optimizer(_cfg(*off, "train.optimizer=adamw"))
    (tmp_path / "off.json").write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    assert resolve_optimizer(_cfg("deepspeed.enabled=true", f"deepspeed.config={tmp_path / 'off.json'}")) == DS_CPU_ADAM

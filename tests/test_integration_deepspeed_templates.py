"""The DeepSpeed configs users copy: the Hugging Face ZeRO-2 and ZeRO-3 templates ("auto" for the batch sizes,
precision, clipping, the optimizer's and scheduler's hyper-parameters and the ZeRO bucket sizes; optimizer states
and, under ZeRO-3, parameters offloaded to the CPU with pinned memory) passed as ``deepspeed.config``.

On 2 gloo ranks each one passes ``megamix train --dry-run`` and trains a few steps of the tiny model through
``torchrun --standalone --nproc_per_node 2 -m megamix train``: megamix fills every "auto" (the ZeRO sizes from the
model's hidden size), keeps the rest of the file, and DeepSpeed builds the template's optimizer (DeepSpeedCPUAdam,
as ZeRO-Offload requires) and LR scheduler. An "auto" megamix has no value for is one line naming the key and
the fix.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from megamix.config import MegamixConfig  # noqa: E402
from megamix.configbase import ConfigError  # noqa: E402
from megamix.integrations.deepspeed import merge_ds_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
HIDDEN = 32   # model.n_embd below: the "auto" ZeRO sizes follow from it

# The Hugging Face templates (transformers' DeepSpeed integration docs), "auto" wherever they have it.
_FP16 = {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2,
         "min_loss_scale": 1}
_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
_TOP = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}
ZERO2 = {
    "fp16": _FP16, "bf16": {"enabled": "auto"}, "optimizer": _OPTIMIZER,
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": "auto", "contiguous_gradients": True},
    **_TOP,
}
ZERO3 = {
    "fp16": _FP16, "bf16": {"enabled": "auto"}, "optimizer": _OPTIMIZER,
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    **_TOP,
}
TEMPLATES = {"zero2": (2, ZERO2), "zero3": (3, ZERO3)}
STEPS, WARMUP, LR = 4, 1, 0.003


def _sets(data_dir: Path, out_dir: Path, zero: int, ds_path: Path) -> list[str]:
    over = [f"data.data_dir={data_dir}", "model.n_layer=1", f"model.n_embd={HIDDEN}", "model.n_head=2",
            "model.seq_len=32", "model.vocab_size=50257", f"train.steps={STEPS}", "train.global_batch_size=8",
            "train.micro_batch_size=2", f"train.lr={LR}", f"train.warmup_steps={WARMUP}", "train.eval_every=0",
            "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=0", f"train.out_dir={out_dir}",
            "train.threads=1", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=2",
            "deepspeed.enabled=true", f"deepspeed.zero_stage={zero}", f"deepspeed.config={ds_path}"]
    return [x for kv in over for x in ("--set", kv)]


def _write(tmp_path: Path, name: str) -> tuple[int, Path]:
    zero, template = TEMPLATES[name]
    path = tmp_path / f"ds_{name}.json"
    path.write_text(json.dumps(template, indent=2))
    return zero, path


def _autos(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _check_filled(conf: dict, name: str) -> None:
    """Every "auto" of the template filled with megamix's value; everything else in the file kept."""
    zero, template = TEMPLATES[name]
    defaults = MegamixConfig().train
    assert _autos(conf) == []
    assert (conf["train_batch_size"], conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]) \
        == (8, 2, 2)
    assert conf["fp16"] == {**_FP16, "enabled": False} and conf["bf16"] == {"enabled": False}
    assert conf["gradient_clipping"] == defaults.grad_clip
    assert conf["optimizer"] == {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                             "weight_decay": defaults.weight_decay}}
    sched = {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": WARMUP}
    if name == "zero3":
        sched["total_num_steps"] = STEPS
    assert conf["scheduler"] == {"type": template["scheduler"]["type"], "params": sched}
    filled = {"reduce_bucket_size": HIDDEN * HIDDEN}
    if zero == 3:
        filled |= {"stage3_prefetch_bucket_size": int(0.9 * HIDDEN * HIDDEN),
                   "stage3_param_persistence_threshold": 10 * HIDDEN}
    assert conf["zero_optimization"] == {**template["zero_optimization"], **filled}
    assert conf["steps_per_print"] == 2000 and conf["wall_clock_breakdown"] is False


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_hf_template_dry_run_on_two_ranks(name, tiny_store, tmp_path, monkeypatch, capsys):
    """`megamix train --dry-run` as rank 0 and rank 1 of 2: both pass; rank 0 prints the merged config."""
    from megamix.cli import main

    zero, path = _write(tmp_path, name)
    argv = ["train", "--dry-run", *_sets(tiny_store.parent, tmp_path / "run", zero, path)]
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert main(argv) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        if rank == 1:
            assert out == ""   # every rank checks, rank 0 reports
    line = next(x for x in out.splitlines() if x.startswith("# deepspeed config: "))
    _check_filled(json.loads(line.split(": ", 1)[1]), name)
    assert f"# note: ZeRO-Offload of the optimizer states to cpu comes from {path}" in out
    assert f"# note: optimizer: AdamW from {path}, built by DeepSpeed" in out


def _deepspeed_lrs(name: str) -> list[float]:
    """The LR of each step under the template's own DeepSpeed scheduler, as megamix filled it."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    kw = {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": WARMUP}
    sched = WarmupDecayLR(opt, total_num_steps=STEPS, **kw) if name == "zero3" else WarmupLR(opt, **kw)
    lrs = []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


# each run takes about 20 s on 2 idle cores (twice that on a busy machine): both are in the slow suite; the
# default suite runs both templates' dry runs on 2 ranks (the config built once, with the hidden size)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_hf_template_trains_on_two_ranks_through_torchrun(name, tiny_store, tmp_path):
    """A real run of the template (ZeRO-3: parameters offloaded to the CPU too) on 2 gloo ranks: it trains, with
    the merged config, DeepSpeed's CPU Adam and the template's LR scheduler, and saves its final checkpoint."""
    zero, path = _write(tmp_path, name)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "megamix", "train", "--no-progress", *_sets(tiny_store.parent, out, zero, path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "megamix: error" not in p.stderr
    # rank 0 alone logs the notes
    assert p.stderr.count(f"megamix: optimizer: AdamW from {path}, built by DeepSpeed") == 1, p.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert (res["backend"], res["world_size"], res["steps"]) == ("deepspeed", WORLD, STEPS)
    _check_filled(json.loads((out / "ds_config.json").read_text()), name)
    train = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x["loss"]) for x in train)
    assert [x["lr"] for x in train] == pytest.approx(_deepspeed_lrs(name)), "the template's scheduler did not drive"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"


def test_an_auto_megamix_cannot_fill_names_the_key_and_the_fix():
    cfg = MegamixConfig.from_yaml(None, overrides=["deepspeed.enabled=true", "deepspeed.zero_stage=3",
                                                   "train.global_batch_size=8", "train.micro_batch_size=2"])
    # the ZeRO sizes need the hidden size: without it, each one is named with what to write instead
    with pytest.raises(ConfigError) as e:
        merge_ds_config(cfg, WORLD, ZERO3, source="ds.json", hidden_size=None)
    lines = str(e.value).splitlines()
    assert lines[0] == "deepspeed.config ds.json conflicts with the megamix config (3):"
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert any(f'zero_optimization.{key}="auto" in ds.json: megamix fills it from the model\'s hidden size' in ln
                   and "set it to a number in ds.json" in ln for ln in lines), (key, lines)
    # a key megamix has no value for
    user = {**ZERO3, "zero_optimization": {**ZERO3["zero_optimization"], "stage3_max_live_parameters": "auto"}}
    with pytest.raises(ConfigError) as e:
        merge_ds_config(cfg, WORLD, user, source="ds.json", hidden_size=HIDDEN)
    assert str(e.value).splitlines()[1:] == [
        '  - zero_optimization.stage3_max_live_parameters="auto" in ds.json: megamix has no value to fill in for this '
        "key; set it to a value in ds.json, or remove it to use DeepSpeed's default"]
    # the other "auto"s of the Hugging Face docs: apex amp (off, so its opt_level sets nothing) and the 16-bit save
    user = {**ZERO3, "amp": {"enabled": "auto", "opt_level": "auto"},
            "zero_optimization": {**ZERO3["zero_optimization"], "stage3_gather_16bit_weights_on_model_save": "auto"}}
    conf, _ = merge_ds_config(cfg, WORLD, user, source="ds.json", hidden_size=HIDDEN)
    assert conf["amp"] == {"enabled": False} and _autos(conf) == []
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False

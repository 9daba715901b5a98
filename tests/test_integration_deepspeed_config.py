"""Your own DeepSpeed config (deepspeed.config): the merge with what megamix must set ("auto" filled, every
conflict reported on its own line, nothing overridden silently), and a real 2-rank gloo run with a user
ds_config whose optimizer and LR scheduler DeepSpeed builds."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from megamix.config import MegamixConfig  # noqa: E402
from megamix.configbase import ConfigError  # noqa: E402
from megamix.integrations.deepspeed import build_ds_config, merge_ds_config, validate_launch  # noqa: E402
from test_integration_deepspeed import WORLD, _cfg, _free_port, _setup_rank  # noqa: E402
from ranks import spawn


def _c(*extra: str) -> MegamixConfig:
    return _cfg("data", "runs/x", 2, *extra)   # global 8 = micro 2 x 2 ranks x 2 accumulation; ZeRO-2


def _write(tmp_path: Path, conf: dict, name: str = "ds.json") -> str:
    (tmp_path / name).write_text(json.dumps(conf))
    return str(tmp_path / name)


# ------------------------------------------------------------------------------------------- the merge
def test_auto_values_are_filled_and_the_users_own_keys_kept():
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto", "overlap_comm": True,
                                  "allgather_bucket_size": 5e7},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                      "eps": "auto", "torch_adam": True}},
            "communication_data_type": "fp32"}
    before = copy.deepcopy(user)
    conf, notes = merge_ds_config(_c("train.dtype=bf16"), WORLD, user, source="ds.json", hidden_size=64)
    assert user == before, "the user's dict was modified"
    assert (conf["train_batch_size"], conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]) \
        == (8, 2, 2)
    assert conf["bf16"] == {"enabled": True} and conf["gradient_clipping"] == 1.0
    z = conf["zero_optimization"]
    assert z["stage"] == 2 and z["reduce_bucket_size"] == 64 * 64
    assert z["overlap_comm"] is True, "megamix's default (off on gloo) replaced the user's value"
    assert z["allgather_bucket_size"] == 5e7 and conf["communication_data_type"] == "fp32"
    assert conf["optimizer"]["params"] == {"lr": 0.003, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8,
                                           "torch_adam": True}
    assert any("optimizer: AdamW from ds.json" in n for n in notes)
    # without a file the merge is megamix's own config, with its optimizer/schedule passed as objects
    own = build_ds_config(_c(), WORLD)
    assert "optimizer" not in own and "scheduler" not in own and own["zero_optimization"]["stage"] == 2


def test_every_conflict_is_reported_on_its_own_line():
    user = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3,
            "bf16": {"enabled": True}, "fp16": {"enabled": True}, "zero_optimization": {"stage": 3},
            "gradient_clipping": 0.5,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_num_steps": "auto",
                                                              "warmup_max_lr": "auto"}},
            "prescale_gradients": "auto"}
    with pytest.raises(ConfigError) as e:
        merge_ds_config(_c("train.optimizer=adamw"), WORLD, user, source="ds.json")
    lines = str(e.value).splitlines()
    assert lines[0] == "deepspeed.config ds.json conflicts with the megamix config (12):"
    body = [ln.removeprefix("  - ") for ln in lines[1:]]
    assert len(body) == 12
    expect = [("train_batch_size=16", "train.global_batch_size=8"),
              ("train_micro_batch_size_per_gpu=4", "train.micro_batch_size=2"),
              ("gradient_accumulation_steps=3", "train.global_batch_size / (train.micro_batch_size x world size 2) = 2"),
              ("bf16.enabled=true", "train.dtype=fp32"), ("fp16.enabled=true", "train.dtype=fp32"),
              ("zero_optimization.stage=3", "deepspeed.zero_stage=2"), ("gradient_clipping=0.5", "train.grad_clip=1.0"),
              ("optimizer (type \"AdamW\")", "train.optimizer=adamw"),
              ("optimizer.params.lr=0.0001", "train.lr=0.003"),
              ("optimizer.params.weight_decay=0.01", "train.weight_decay=0.1"),
              ("scheduler.params.total_num_steps=100", "train.steps=6"),
              ("prescale_gradients=\"auto\"", "no value")]
    for line, (key, field) in zip(body, expect):
        assert line.startswith(key) and field in line and ("set " in line or "remove" in line), line


@pytest.mark.parametrize("key,value", [("train_batch_size", 4), ("gradient_accumulation_steps", 1),
                                       ("zero_optimization", {"stage": 1}), ("bf16", {"enabled": True}),
                                       ("gradient_clipping", 2.0)])
def test_a_users_value_is_never_overridden_silently(key, value):
    with pytest.raises(ConfigError, match=key.split("_optimization")[0]):
        merge_ds_config(_c(), WORLD, {key: value})
    same = merge_ds_config(_c(), WORLD, {"train_batch_size": 8, "gradient_clipping": 1})[0]   # equal values are fine
    assert same["train_batch_size"] == 8


def test_scheduler_sections_and_optimizer_offload():
    cfg = _c("train.steps=40", "train.warmup_steps=4", "train.min_lr_ratio=0.2")
    conf, notes = merge_ds_config(cfg, WORLD, {"scheduler": {"type": "WarmupCosineLR", "params": {
        "total_num_steps": "auto", "warmup_num_steps": "auto", "cos_min_ratio": "auto", "warmup_min_ratio": "auto",
        "warmup_type": "auto"}}})
    assert conf["scheduler"]["params"] == {"total_num_steps": 40, "warmup_num_steps": 4, "cos_min_ratio": 0.2,
                                           "warmup_min_ratio": 0.0, "warmup_type": "linear"}
    assert any("WarmupCosineLR from ds_config (megamix's linear warm-up + cosine decay is not used)" in n for n in notes)
    # a scheduler megamix has no mapping for: kept, with a note; an "auto" in it has no value
    conf, notes = merge_ds_config(cfg, WORLD, {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4}}})
    assert conf["scheduler"]["params"] == {"cycle_min_lr": 1e-4} and any("do not apply" in n for n in notes)
    with pytest.raises(ConfigError, match="scheduler.params.cycle_max_lr=\"auto\""):
        merge_ds_config(cfg, WORLD, {"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": "auto"}}})
    with pytest.raises(ConfigError, match="needs at least 1 warm-up step"):
        merge_ds_config(_c("train.warmup_steps=0"), WORLD, {"scheduler": {"type": "WarmupLR", "params": {}}})
    # offload from the file is kept and reported; deepspeed.offload_optimizer=true against another device conflicts
    conf, notes = merge_ds_config(cfg, WORLD, {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})
    assert conf["zero_optimization"]["offload_optimizer"] == {"device": "nvme"} and any("nvme" in n for n in notes)
    with pytest.raises(ConfigError, match="offload_optimizer.device=\"nvme\" .* vs deepspeed.offload_optimizer=true"):
        merge_ds_config(_c("deepspeed.offload_optimizer=true"), WORLD,
                        {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})


def test_bad_files_and_the_dry_run(tmp_path, capsys):
    from megamix.cli import main

    with pytest.raises(ConfigError, match="no such file"):
        validate_launch(_c(f"deepspeed.config={tmp_path / 'missing.json'}"), WORLD)
    (tmp_path / "bad.json").write_text('{"train_batch_size": 8,\n "zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="not valid JSON: .* at line 2 column"):
        validate_launch(_c(f"deepspeed.config={tmp_path / 'bad.json'}"), WORLD)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        validate_launch(_c(f"deepspeed.config={tmp_path / 'list.json'}"), WORLD)
    # `megamix train --dry-run` reports the conflicts (exit code 2, no traceback)
    path = _write(tmp_path, {"train_batch_size": 32, "bf16": {"enabled": True}})
    rc = main(["train", "--dry-run", "--set", "deepspeed.enabled=true", "--set", f"deepspeed.config={path}",
               "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=16"])
    err = capsys.readouterr().err
    assert rc == 2 and "conflicts with the megamix config (2)" in err
    assert "train_batch_size=32 in " in err and "bf16.enabled=true in " in err


# ------------------------------------------------------------------------------------------- a real run
DS_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
    "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto", "allgather_bucket_size": 50000000},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto",
                                              "torch_adam": True}},
}
SCHEDULER = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                  "cos_min_ratio": "auto", "warmup_type": "linear"}}


def _worker(rank: int, port: int, data_dir: str, root: str) -> None:
    _setup_rank(rank, port)
    from megamix.train.loop import train

    def run(name, ds_config, **kw):
        extra = (f"deepspeed.config={ds_config}",) if ds_config else ()
        r = train(_cfg(data_dir, f"{root}/{name}", 2, "train.steps=4", *extra), rank=rank, world_size=WORLD,
                  progress=False, log_to_stdout=False, **kw)
        return {"losses": r.step_losses, "weights": r.weights, "history": r.weight_history, "start": r.start_step}

    out = {"megamix": run("megamix", None), "user_opt": run("user_opt", f"{root}/opt.json"),
           "sched1": run("sched", f"{root}/sched.json", stop_at_step=2), "sched2": run("sched", f"{root}/sched.json")}
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))


def test_two_ranks_with_a_user_ds_config(tmp_path, tiny_store):
    """ZeRO-2 on 2 gloo ranks. (1) A ds_config whose optimizer section DeepSpeed builds (torch AdamW, "auto"
    hyper-parameters) trains exactly like megamix's own optimizer. (2) With its WarmupCosineLR scheduler as well,
    stopped at step 2 and resumed: the LR of every step is DeepSpeed's schedule, continued across the resume."""
    _write(tmp_path, DS_CONFIG, "opt.json")
    _write(tmp_path, {**DS_CONFIG, "scheduler": SCHEDULER}, "sched.json")
    spawn(_worker, (_free_port(), str(tiny_store.parent), str(tmp_path)), WORLD)
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(WORLD)]
    assert r[0]["user_opt"]["history"] == r[1]["user_opt"]["history"]
    np.testing.assert_allclose(r[0]["user_opt"]["losses"], r[0]["megamix"]["losses"], rtol=1e-6)
    assert r[0]["user_opt"]["weights"] == pytest.approx(r[0]["megamix"]["weights"], abs=1e-9)
    merged = json.loads((tmp_path / "user_opt" / "ds_config.json").read_text())
    assert merged["optimizer"]["params"]["lr"] == 0.003 and merged["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    # the user's scheduler drives the LR (and the metrics log the LR each step really used): DeepSpeed's
    # WarmupCosineLR over train.steps=4 with train.warmup_steps=2 and cos_min_ratio=train.min_lr_ratio
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    sched = WarmupCosineLR(opt, total_num_steps=4, warmup_num_steps=2, cos_min_ratio=0.1, warmup_type="linear")
    expected = []
    for _ in range(4):
        expected.append(opt.param_groups[0]["lr"])
        sched.step()
    lrs = [x["lr"] for x in map(json.loads, (tmp_path / "sched" / "metrics.jsonl").read_text().splitlines())
           if x["kind"] == "train"]
    assert r[0]["sched2"]["start"] == 2 and len(set(lrs)) >= 3
    assert lrs == pytest.approx(expected), "the scheduler did not drive the LR, or its state was not resumed"
    losses = r[0]["sched1"]["losses"] + r[0]["sched2"]["losses"]
    assert losses[:2] != r[0]["user_opt"]["losses"][:2] and all(np.isfinite(losses))
    # init_from reads the engine's checkpoint (ZeRO-2 keeps the full module in mp_rank_00_model_states.pt)
    from megamix.train.model import build_model

    cfg = _cfg(str(tiny_store.parent), str(tmp_path / "x"), 2)
    fresh = build_model(cfg.model, seed=0)
    loaded = build_model(_cfg(str(tiny_store.parent), str(tmp_path / "x"), 2,
                              f"model.init_from={tmp_path / 'sched' / 'checkpoints' / 'step_0000004'}").model, seed=0)
    diff = [not torch.equal(p, q) for p, q in zip(fresh.parameters(), loaded.parameters())]
    assert all(diff), "init_from left some tensors at their random init"


@pytest.mark.slow
def test_zero_offload_runs_deepspeeds_cpu_adam(tmp_path, tiny_store):
    """deepspeed.offload_optimizer=true with train.optimizer=auto builds DeepSpeedCPUAdam (DeepSpeed refuses a torch
    optimizer under ZeRO-Offload); it JIT-builds the cpu_adam op once (1-2 minutes cold). Same losses as AdamW."""
    from test_integration_deepspeed import _spawn_runs

    runs = [("adamw", 2, ("train.steps=3",), {}), ("offload", 2, ("train.steps=3", "deepspeed.offload_optimizer=true"), {})]
    res = _spawn_runs(tmp_path, tiny_store, runs)
    np.testing.assert_allclose(res["offload"][0]["losses"], res["adamw"][0]["losses"], rtol=1e-4)
    assert res["offload"][0]["history"] == res["offload"][1]["history"]

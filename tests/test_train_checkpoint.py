"""The one checkpoint layout (megamix.train.checkpoint): `latest` names complete checkpoints only, megamix
0.1 layouts still resume, and mismatches (world size, backend) are one-line errors naming the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError


def _cfg(data_dir: Path, out_dir: Path, *extra: str) -> MegamixConfig:
    ov = [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", "model.n_layer=1", "model.n_embd=32",
          "model.n_head=2", "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
          "train.warmup_steps=2", "train.eval_batches=1", "train.eval_every=0", "train.threads=1",
          "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=2", *extra]
    return MegamixConfig.from_yaml(None, ov).validate()


def test_layout_and_v01_single_process_checkpoint_resumes(tiny_store, tmp_path):
    from megamix.train.checkpoint import SIDE_FILE
    from megamix.train.loop import train

    data = tiny_store.parent
    full = train(_cfg(data, tmp_path / "full", "train.steps=6"), progress=False, log_to_stdout=False)
    train(_cfg(data, tmp_path / "old", "train.steps=3"), progress=False, log_to_stdout=False)
    ck = tmp_path / "old" / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000003"
    assert sorted(p.name for p in (ck / "step_0000003").iterdir()) == [SIDE_FILE.format(rank=0), "model.pt"]
    # rewrite it as megamix 0.1 wrote it: one file per step and `latest` naming that file
    side = torch.load(ck / "step_0000003" / SIDE_FILE.format(rank=0), weights_only=False)
    model = torch.load(ck / "step_0000003" / "model.pt", weights_only=False)
    torch.save({"model": model["model"], "optimizer": model["optimizer"], "mixer": side["mixer"],
                "torch_rng": side["torch_rng"], "cuda_rng": None, "step": 3, "config": side["config"]},
               ck / "step_0000003.pt")
    for p in (ck / "step_0000003").iterdir():
        p.unlink()
    (ck / "step_0000003").rmdir()
    (ck / "latest").write_text("step_0000003.pt")
    resumed = train(_cfg(data, tmp_path / "old", "train.steps=6"), progress=False, log_to_stdout=False)
    assert resumed.start_step == 3
    assert resumed.weights == full.weights and resumed.step_losses == full.step_losses[3:]


def test_mismatched_backend_and_world_size_are_clear_errors(tiny_store, tmp_path):
    from megamix.train.backend import PlainBackend
    from megamix.train.checkpoint import Checkpoints
    from megamix.train.loop import train

    train(_cfg(tiny_store.parent, tmp_path / "r", "train.steps=2"), progress=False, log_to_stdout=False)

    class Other(PlainBackend):
        name = "deepspeed"

    with pytest.raises(ConfigError, match="written by the 'plain' backend.*deepspeed.enabled=false"):
        Checkpoints(tmp_path / "r").load(Other(), mixer=None)
    with pytest.raises(ConfigError, match="same world size"):
        Checkpoints(tmp_path / "r").load(PlainBackend(rank=1, world_size=2), mixer=None)
    with pytest.raises(ConfigError, match="deepspeed.enabled=true for multi-rank"):
        PlainBackend(rank=0, world_size=2).check(_cfg(tiny_store.parent, tmp_path / "x", "train.steps=1"))

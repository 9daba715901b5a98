"""The one checkpoint layout (megamix.train.checkpoint): `latest` names complete checkpoints only, and
mismatches (world size, backend) are one-line errors naming the fix."""
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


def test_layout_and_resume(tiny_store, tmp_path):
    from megamix.train.checkpoint import DONE_FILE, SIDE_FILE
    from megamix.train.loop import train

    data = tiny_store.parent
    full = train(_cfg(data, tmp_path / "full", "train.steps=6"), progress=False, log_to_stdout=False)
    train(_cfg(data, tmp_path / "old", "train.steps=3"), progress=False, log_to_stdout=False)
    ck = tmp_path / "old" / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000003"
    assert sorted(p.name for p in (ck / "step_0000003").iterdir()) == [
        "config.yaml", DONE_FILE.format(rank=0), SIDE_FILE.format(rank=0), "model.pt"]
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

    class Fixed(PlainBackend):  # a backend that cannot resume on another world size (no resize_note); the plain
        resize_note = None      # and DDP ones can (tests/test_train_elastic_ddp.py)

    with pytest.raises(ConfigError, match="same world size"):
        Checkpoints(tmp_path / "r").load(Fixed(rank=1, world_size=2), mixer=None)
    with pytest.raises(ConfigError, match="deepspeed.enabled=true for multi-rank"):
        PlainBackend(rank=0, world_size=2).check(_cfg(tiny_store.parent, tmp_path / "x", "train.steps=1"))


# ------------------------------------------------------------------ crash consistency, fallback, retention
def _losses(out_dir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (the last record of a step wins)."""
    import json
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.fixture(scope="module")
def full6(tiny_store, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints every 2 steps): the reference for resumed runs."""
    from megamix.train.loop import train

    out = tmp_path_factory.mktemp("full6") / "run"
    res = train(_cfg(tiny_store.parent, out, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1"),
                progress=False, log_to_stdout=False)
    return res, out


def _resume6(tiny_store, out: Path):
    from megamix.train.loop import train

    return train(_cfg(tiny_store.parent, out, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1"),
                 progress=False, log_to_stdout=False)


def _copy_until(full: Path, dst: Path, step: int) -> Path:
    """A run directory as the full run left it after step ``step``'s checkpoint."""
    import shutil

    shutil.copytree(full, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.startswith("step_") and int(p.name[5:]) > step:
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:07d}")
    return dst


@pytest.mark.parametrize("phase", ["model_saved", "side_saved"])
def test_crash_inside_a_save_resumes_from_the_previous_checkpoint(tiny_store, tmp_path, full6, caplog, phase):
    """A crash between the model files and megamix's side files (or before the marker) leaves checkpoint 4
    incomplete: resume says so, restarts from 2, and ends bit-identical to the uninterrupted run."""
    from megamix.train.loop import train

    class Crash(Exception):
        pass

    def crash(p, step, rank):
        if (p, step) == (phase, 4):
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(_cfg(tiny_store.parent, out, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1"),
              progress=False, log_to_stdout=False, checkpoint_hook=crash)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    with caplog.at_level("WARNING", logger="megamix"):
        res = _resume6(tiny_store, out)
    warn = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warn) == 1 and "step_0000002" in warn[0] and "skipped step_0000004" in warn[0], warn
    assert "megamix_rank00000" in warn[0] and "world size" not in warn[0]
    ref, ref_dir = full6
    assert res.start_step == 2 and res.weights == ref.weights and res.weight_history == ref.weight_history
    assert _losses(out) == _losses(ref_dir)
    for step in (4, 6):
        a = torch.load(out / "checkpoints" / f"step_{step:07d}" / "model.pt", weights_only=False)["model"]
        b = torch.load(ref_dir / "checkpoints" / f"step_{step:07d}" / "model.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_latest_naming_an_incomplete_checkpoint_is_not_blamed_on_world_size(tiny_store, tmp_path, full6, caplog):
    """The checkpoint `latest` names has no megamix files (a kill before megamix's side files and markers): resume
    falls back to the previous one instead of blaming the unchanged world size."""
    ref, ref_dir = full6
    out = _copy_until(ref_dir, tmp_path / "run", 4)
    d = out / "checkpoints" / "step_0000004"
    for p in d.glob("megamix_rank*"):
        p.unlink()
    with caplog.at_level("WARNING", logger="megamix"):
        res = _resume6(tiny_store, out)
    warn = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped step_0000004" in warn and "world size" not in warn
    assert res.start_step == 2 and res.weights == ref.weights and _losses(out) == _losses(ref_dir)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_torn_newest_checkpoint_falls_back_naming_the_file(tiny_store, tmp_path, full6, caplog, damage):
    ref, ref_dir = full6
    out = _copy_until(ref_dir, tmp_path / "run", 4)
    bad = out / "checkpoints" / "step_0000004" / "model.pt"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garble":   # same size: only reading it can tell
        bad.write_bytes(b"\x00" * 64 + data[64:])
    else:
        bad.unlink()
    with caplog.at_level("WARNING", logger="megamix"):
        res = _resume6(tiny_store, out)
    warn = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warn) == 1 and str(bad) in warn[0], warn
    assert res.start_step == 2 and res.weights == ref.weights and _losses(out) == _losses(ref_dir)


def test_no_readable_checkpoint_starts_over_with_a_warning(tiny_store, tmp_path, full6, caplog):
    ref, ref_dir = full6
    out = _copy_until(ref_dir, tmp_path / "run", 2)
    (out / "checkpoints" / "step_0000002" / "megamix_rank00000.pt").write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="megamix"):
        res = _resume6(tiny_store, out)
    assert any("no complete checkpoint to resume from" in r.getMessage() and "starting from step 0" in r.getMessage()
               for r in caplog.records)
    assert res.start_step == 0 and res.weights == ref.weights


def test_keep_checkpoints_prunes_older_complete_ones_only(tiny_store, tmp_path):
    import shutil

    from megamix.train.checkpoint import Checkpoints
    from megamix.train.loop import train

    out = tmp_path / "run"
    ck = out / "checkpoints"
    (ck / "step_0000001").mkdir(parents=True)                        # incomplete (a crash): not ours to delete
    train(_cfg(tiny_store.parent, out, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"),
          progress=False, log_to_stdout=False)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_0000001", "step_0000006", "step_0000008"]
    # a newer checkpoint (another run's) is never touched, nor the one `latest` names even when older
    shutil.copytree(ck / "step_0000008", ck / "step_0000099")
    (ck / "latest").write_text("step_0000006")
    Checkpoints(out)._prune(8, keep=1)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_0000001", "step_0000006", "step_0000008",
                                                    "step_0000099"]
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 0"):
        _cfg(tiny_store.parent, out, "train.keep_checkpoints=-1")


# ------------------------------------------------------------------ resume against a changed config
def test_resume_with_a_changed_config_is_a_clear_error(tiny_store, tmp_path, capsys, caplog):
    from megamix.cli import main
    from megamix.train.loop import train

    out = tmp_path / "run"
    data = tiny_store.parent
    train(_cfg(data, out, "train.steps=2"), progress=False, log_to_stdout=False)
    with pytest.raises(ConfigError, match=r"(?s)mixing.strategy: 'rnb' \(checkpoint\) -> 'dograph' \(now\)  "
                                          r"\[cannot change on resume\].*start a new train.out_dir"):
        train(_cfg(data, out, "train.steps=3", "mixing.strategy=dograph"), progress=False, log_to_stdout=False)
    with pytest.raises(ConfigError, match=r"model.n_embd: 32 \(checkpoint\) -> 64 \(now\)"):
        train(_cfg(data, out, "train.steps=3", "model.n_embd=64"), progress=False, log_to_stdout=False)
    with pytest.raises(ConfigError, match=r"(?s)train.lr: 0.003 \(checkpoint\) -> 0.001 \(now\).*"
                                          r"--set train.resume_allow_changes=\[train.lr\]"):
        train(_cfg(data, out, "train.steps=3", "train.lr=0.001"), progress=False, log_to_stdout=False)
    with caplog.at_level("WARNING", logger="megamix"):
        res = train(_cfg(data, out, "train.steps=3", "train.lr=0.001", "train.resume_allow_changes=[train.lr]",
                         "train.eval_every=1", "train.log_every=1", "train.checkpoint_every=1",
                         "train.keep_checkpoints=1"), progress=False, log_to_stdout=False)
    assert res.start_step == 2 and res.steps == 3
    changed = [r.getMessage() for r in caplog.records if "resuming with a changed config" in r.getMessage()]
    assert len(changed) == 1 and "train.lr: 0.003 (checkpoint) -> 0.001 (now)" in changed[0]
    assert "train.steps: 2 (checkpoint) -> 3 (now)" in changed[0]
    # the checkpoint carries its own config
    assert "lr: 0.001" in (out / "checkpoints" / "step_0000003" / "config.yaml").read_text()
    # the CLI: exit code 2, one line per differing field, then the fix
    y = tmp_path / "c.yaml"
    y.write_text(_cfg(data, out, "train.steps=4", "mixing.strategy=dograph", "model.n_layer=2").to_yaml())
    assert main(["train", "--config", str(y), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layer: 1 (checkpoint) -> 2 (now)" in err and "mixing.strategy: 'rnb'" in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError, match="model.n_layer cannot change on resume"):
        _cfg(data, out, "train.resume_allow_changes=[model.n_layer]")
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        _cfg(data, out, "train.resume_allow_changes=[train.lrr]")


class _FakeCuda:
    """torch.cuda's random-state functions as a GPU machine has them: one generator per device (a byte tensor)."""

    def __init__(self, monkeypatch, device: int):
        self.device = device
        self.states = {device: torch.tensor([device, 7, 7], dtype=torch.uint8)}
        self.restored: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev="cuda": self.states[torch.device(dev).index
                                                                                        or self.device].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, dev="cuda": self.restored.append(
            (torch.device(dev).index, st.clone())))


def test_each_rank_saves_and_restores_its_own_cuda_rng(tiny_store, tmp_path, monkeypatch, caplog):
    """The side file of every rank holds that rank's CUDA generator (for DeepSpeed, which saved the CPU one only,
    and DDP, which restored rank 0's everywhere); a resume restores each rank's own. Two ranks of one checkpoint
    are written and read in one process here (their collectives are no-ops without a process group)."""
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    from megamix.train.backend import PlainBackend
    from megamix.train.checkpoint import SIDE_FILE, Checkpoints

    cfg = _cfg(tiny_store.parent, tmp_path / "run", "train.steps=2", "train.device=cpu")

    class Rank(PlainBackend):
        def save(self, root, tag):
            if self.rank == 0:
                super().save(root, tag)

    def backend(rank, world=2):
        b = Rank(rank, world)
        model = torch.nn.Linear(4, 4)
        b.setup(model, torch.optim.AdamW(model.parameters()), lambda s: 1e-3, cfg)
        return b

    mixer = Mixer(cfg, TokenStore(tiny_store))
    fakes = {}
    for rank in (1, 0):            # rank 0 publishes `latest` last
        fakes[rank] = _FakeCuda(monkeypatch, device=rank)
        Checkpoints(tmp_path / "run").save(2, backend(rank), mixer, cfg)
        side = torch.load(tmp_path / "run" / "checkpoints" / "step_0000002" / SIDE_FILE.format(rank=rank),
                          weights_only=False)
        assert side["cuda_rng"].tolist() == [rank, 7, 7]
    assert "cuda_rng" not in torch.load(tmp_path / "run" / "checkpoints" / "step_0000002" / "model.pt",
                                        weights_only=False)
    for rank in (0, 1):
        fake = _FakeCuda(monkeypatch, device=rank)
        assert Checkpoints(tmp_path / "run").load(backend(rank), mixer, cfg) == 2
        assert [(d, s.tolist()) for d, s in fake.restored] == [(rank, [rank, 7, 7])]
    # a checkpoint written without CUDA, resumed with it: said in one line, nothing restored
    monkeypatch.undo()
    Checkpoints(tmp_path / "cpu").save(2, backend(0, 1), mixer, cfg)
    fake = _FakeCuda(monkeypatch, device=0)
    with caplog.at_level("WARNING", logger="megamix"):
        assert Checkpoints(tmp_path / "cpu").load(backend(0, 1), mixer, cfg) == 2
    assert fake.restored == [] and "holds no CUDA random state" in caplog.text

"""Run telemetry (megamix.train.metrics, progress, plots, integrations.wandb): the per-domain mixture telemetry in
metrics.jsonl / TensorBoard / W&B / the PNG, TensorBoard tags without a doubled prefix, plain log lines when
stdout is not a terminal, W&B offline runs, statistics snapshots replayed by `megamix mix simulate`, weight
plots that show small moves, and — on 2 DeepSpeed ranks — no duplicate records after a resume and the same
PNGs as a single-process run."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from megamix.config import MegamixConfig
from ranks import spawn

DOMAINS = ["changelogs", "code_python", "legal", "manpages"]


def _cfg(data_dir: Path, out_dir: Path, *extra: str) -> MegamixConfig:
    ov = [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", "model.n_layer=1", "model.n_embd=32",
          "model.n_head=2", "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
          "train.warmup_steps=2", "train.eval_batches=1", "train.eval_every=0", "train.threads=1",
          "projection.k1=8", "projection.k2=4", "train.lr=0.01", "train.steps=6", "train.log_every=2",
          "mixing.strategy=rnb", "mixing.update_every=2", "mixing.rnb_lambda=5", *extra]
    return MegamixConfig.from_yaml(None, ov).validate()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tb_scalars(run_dir: Path) -> dict[str, list[int]]:
    """TensorBoard tag -> steps, as TensorBoard shows them (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the offline W&B run under ``run_dir/wandb`` (its ``run-<id>.wandb`` record log:
    a 7-byte header, then LevelDB-log blocks of 32 KiB whose records are ``Record`` protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    rows, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return rows


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    """One 6-step R&B run on the plain backend, progress on, stdout/stderr captured (not terminals), W&B offline,
    2 snapshots kept. Returns (run dir, stdout, stderr, result)."""
    from megamix.train.loop import train

    out = tmp_path_factory.mktemp("metrics") / "run"
    cfg = _cfg(tiny_store.parent, out, "logging.wandb=true", "logging.wandb_mode=offline", "logging.snapshots=2",
               "logging.wandb_project=megamix-test")
    so, se = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            res = train(cfg, progress=True, log_to_stdout=True)
    return out, so.getvalue(), se.getvalue(), res


def test_mixture_telemetry_reaches_metrics(run):
    """realised vs target share, tokens and epochs per domain in every train record (was always `{}`)."""
    out, _, _, res = run
    trains = [r for r in _records(out) if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [2, 4, 6]
    for r in trains:
        assert sorted(r["realised_share"]) == DOMAINS and sorted(r["target_share"]) == DOMAINS
        assert abs(sum(r["realised_share"].values()) - 1) < 1e-9 and abs(sum(r["target_share"].values()) - 1) < 1e-9
        assert sum(r["tokens"].values()) == r["step"] * 8 * 32
        assert all(0 < e < 1 for e in r["epochs"].values())
        # the sampler's bound: |realised - target| < max(1, D-1) samples over step x 8 samples
        assert r["max_share_error"] < 3 / (r["step"] * 8)
        assert sorted(r["realised_share_window"]) == DOMAINS


def test_tensorboard_tags_have_no_doubled_prefix(run):
    out = run[0]
    tags = _tb_scalars(out)
    assert "weights/code_python" in tags and not any(t.startswith("weights/weights/") for t in tags)
    assert tags["train/loss"] == [2, 4, 6]
    assert {f"train/realised_share/{d}" for d in DOMAINS} <= set(tags)
    assert "train/tokens/legal" in tags and "mixing/domain_train_loss/legal" in tags


def test_plain_log_lines_when_stdout_is_not_a_terminal(run):
    _, stdout, stderr, _ = run
    lines = [x for x in stdout.splitlines() if x.startswith("train step ")]
    assert [x.split(" (")[0] for x in lines] == ["train step 2/6", "train step 4/6", "train step 6/6"], stdout
    for x in lines:
        assert "| loss " in x and " tok/s | lr " in x and "| weights: " in x and "(eff. " in x
    assert "\r" not in stdout + stderr  # no tqdm fragments


def test_wandb_offline_run_holds_the_metrics(run):
    out, _, _, res = run
    rows = _wandb_history(out)
    loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    recs = {r["step"]: r["loss"] for r in _records(out) if r["kind"] == "train"}
    assert loss.keys() == recs.keys() and all(abs(loss[s] - recs[s]) < 1e-12 for s in recs)
    assert any("train/realised_share/legal" in r for r in rows)
    weights = [r for r in rows if "weights/legal" in r]
    assert weights and abs(weights[-1]["weights/legal"] - res.weights["legal"]) < 1e-12
    assert (out / "wandb_run_id").read_text().strip() in str(next(out.glob("wandb/offline-run-*")))


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    from megamix.config import LoggingConfig
    from megamix.integrations.wandb import RUN_ID_FILE, WandbRun

    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = LoggingConfig(wandb=True, wandb_mode="offline")
    first = WandbRun(tmp_path, settings, {"a": 1})
    first.log({"train/loss": 2.0}, 1)
    first.finish()
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    again = WandbRun(tmp_path, settings, {"a": 1}, resume=True)
    again.finish()
    fresh = WandbRun(tmp_path, settings, {"a": 1}, resume=False)
    fresh.finish()
    assert again.run.id == run_id and fresh.run.id != run_id


def test_snapshots_bounded_and_replayed_by_mix_simulate(run, capsys):
    from megamix.cli import main
    from megamix.snapshot import load_snapshot_npz

    out = run[0]
    snaps = out / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["latest.npz", "step_0000004.npz", "step_0000006.npz"]
    latest = load_snapshot_npz(snaps / "latest.npz")
    mixing = [r for r in _records(out) if r["kind"] == "mixing"]
    assert latest.step == 6 and latest.domain_names == DOMAINS
    assert latest.counts.tolist() == [mixing[-1]["counts"][d] for d in DOMAINS]
    np.testing.assert_allclose(latest.gram, np.array(mixing[-1]["gram"]), rtol=1e-12)
    capsys.readouterr()
    assert main(["mix", "simulate", "--snapshot", str(snaps / "step_0000004.npz"), "--snapshot",
                 str(snaps / "latest.npz"), "--set", "mixing.strategy=rnb", "--init", "counts", "--json"]) == 0
    rounds = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rounds) == 2 and all(abs(sum(r["weights"].values()) - 1) < 1e-9 for r in rounds)


def test_plots_show_small_weight_moves(run, tmp_path):
    """Weights as lines plus a delta panel in percentage points: a 0.1 pp move is visible (stacked areas
    alone would hide it). The run writes curves.png and gram.png."""
    from matplotlib.collections import PolyCollection

    from megamix.train.plots import PANEL_TITLES, run_figure

    out = run[0]
    assert sorted(p.name for p in out.glob("*.png")) == ["curves.png", "gram.png"]
    m = tmp_path / "metrics.jsonl"
    w0 = {"a": 0.25, "b": 0.25, "c": 0.5}
    w1 = {"a": 0.251, "b": 0.249, "c": 0.5}
    m.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "weights", "step": 0, "weights": w0}, {"kind": "weights", "step": 10, "weights": w1},
        {"kind": "train", "step": 20, "loss": 3.0, "realised_share": w1, "target_share": w0,
         "tokens": {"a": 10, "b": 10, "c": 20}, "epochs": {"a": 0.1, "b": 0.1, "c": 0.2}}]))
    fig = run_figure(m)
    axes = {ax.get_title(): ax for ax in fig.axes}
    w_ax, d_ax = axes[PANEL_TITLES[3]], axes[PANEL_TITLES[4]]
    assert len(w_ax.get_lines()) == 3 and not [c for c in w_ax.collections if isinstance(c, PolyCollection)]
    deltas = {ln.get_label(): ln.get_ydata() for ln in d_ax.get_lines() if ln.get_label() in w0}
    assert deltas["a"][-1] == pytest.approx(0.1) and deltas["b"][-1] == pytest.approx(-0.1)
    lo, hi = d_ax.get_ylim()
    assert -1 < lo < -0.09 and 0.09 < hi < 1  # the axis is scaled to the move
    share = {ln.get_label(): ln.get_ydata() for ln in axes[PANEL_TITLES[5]].get_lines() if ln.get_label() in w0}
    assert share["a"][-1] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------- DeepSpeed, 2 ranks
def _ds_worker(rank: int, port: int, data_dir: str, root: str) -> None:
    import torch.distributed as dist
    from test_integration_deepspeed import WORLD, _cfg as ds_cfg, _setup_rank

    _setup_rank(rank, port)
    from megamix.train.loop import train

    def cfg():
        return ds_cfg(data_dir, f"{root}/ds", 1, "train.checkpoint_every=2", "mixing.update_every=1",
                      "train.log_every=1")

    train(cfg(), rank=rank, world_size=WORLD, progress=False, log_to_stdout=False, stop_at_step=5)
    dist.barrier()
    if rank == 0:  # a kill after step 5's records and before its checkpoint: the newest checkpoint is step 4
        ck = Path(root, "ds", "checkpoints")
        shutil.rmtree(ck / "step_0000005")
        (ck / "latest").write_text("step_0000004")
    dist.barrier()
    r = train(cfg(), rank=rank, world_size=WORLD, progress=False, log_to_stdout=False)
    Path(root, f"ds_rank{rank}.json").write_text(json.dumps({"start": r.start_step, "losses": r.step_losses}))


def test_deepspeed_resume_no_duplicate_records_and_same_pngs(tmp_path, tiny_store):
    """2 DeepSpeed ranks (ZeRO-1), stopped after step 5 with the step-5 checkpoint lost, resumed from step 4 to 6:
    each record appears once in metrics.jsonl, TensorBoard shows each step once, the snapshots are steps 1-6;
    the run writes the same PNGs and the same mixture telemetry as the single-process run."""
    pytest.importorskip("deepspeed")
    from test_integration_deepspeed import WORLD, _cfg as ds_cfg, _free_port

    from megamix.train.loop import train

    data_dir = str(tiny_store.parent)
    spawn(_ds_worker, (_free_port(), data_dir, str(tmp_path)), WORLD)
    res = json.loads((tmp_path / "ds_rank0.json").read_text())
    assert res["start"] == 4 and len(res["losses"]) == 2
    ds = tmp_path / "ds"
    recs = _records(ds)
    keys = [(r["kind"], r["step"]) for r in recs]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert [s for k, s in keys if k == "train"] == [1, 2, 3, 4, 5, 6]
    tags = _tb_scalars(ds)
    assert tags["train/loss"] == [1, 2, 3, 4, 5, 6]
    assert tags["mixing/counts/legal"] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (ds / "snapshots").iterdir()) == (
        ["latest.npz"] + [f"step_{s:07d}.npz" for s in range(1, 7)])

    extra = ("train.checkpoint_every=2", "mixing.update_every=1", "train.log_every=1", "deepspeed.enabled=false")
    plain = train(ds_cfg(data_dir, str(tmp_path / "plain"), 1, *extra), progress=False, log_to_stdout=False)
    assert plain.backend == "plain"
    pngs = lambda d: sorted(p.name for p in d.glob("*.png"))  # noqa: E731
    assert pngs(ds) == pngs(tmp_path / "plain") == ["curves.png", "gram.png"]
    # rank 0's mixture telemetry counts both ranks' samples: all of every global batch, and the same per-domain
    # counts as the single process while the weights are the initial ones (step 1)
    tok = {d: {r["step"]: r["tokens"] for r in _records(d) if r["kind"] == "train"} for d in (ds, tmp_path / "plain")}
    assert all(sum(v.values()) == s * 8 * 32 for s, v in tok[ds].items())
    assert tok[ds][1] == tok[tmp_path / "plain"][1]
    assert os.path.getsize(ds / "curves.png") > 10_000

"""The one training loop on the DDP backend (megamix.train.backend.DDPBackend): real 2-rank gloo runs on CPU.

Checked: gradient accumulation under no_sync (local gradients on the first micro-step, all-reduced ones on
the last) with the fused LM head on tied embeddings, equal to the single-process gradient of the whole
global batch; per-step losses equal the plain single-process run over the same global batches; parameters
identical on both ranks; exact resume mid-round; the capture path on the DDP-wrapped model; the checkpoint layout (model.pt once, a side file per rank);
the mixture telemetry counts every rank's samples; `torchrun -m megamix train` without DeepSpeed runs DDP.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.train.checkpoint import CONFIG_COPY, DONE_FILE, SIDE_FILE
from ranks import free_port as _free_port, spawn

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]



def _overrides(data_dir: str, out_dir: str) -> list[str]:
    return [f"data.data_dir={data_dir}", f"train.out_dir={out_dir}", "model.n_layer=1", "model.n_embd=32",
            "model.n_head=2", "model.seq_len=32", "train.steps=4", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.lr=0.003", "train.warmup_steps=2", "train.eval_every=0",
            "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=0", "train.threads=1",
            "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=2",
            "mixing.min_weight=0.02", "logging.tensorboard=false"]


def _cfg(data_dir: str, out_dir: str, *extra: str) -> MegamixConfig:
    return MegamixConfig.from_yaml(None, _overrides(data_dir, out_dir) + list(extra)).validate()


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _grad_check(rank: int, cfg: MegamixConfig, store_dir: str) -> dict:
    """One optimizer step's gradients through DDPBackend + the fused head (tied embeddings), 2 micro-steps per
    rank: after the first micro-step the head gradient is this rank's own (no_sync); after the last it is the
    all-reduced mean, equal to a single process's gradient over the whole global batch."""
    from megamix.data.store import TokenStore
    from megamix.integrations.hf import apply_megamix
    from megamix.mixer import Mixer
    from megamix.train.backend import DDPBackend
    from megamix.train.loop import build_optimizer
    from megamix.train.model import build_model

    store = TokenStore(store_dir)
    backend = DDPBackend(rank, WORLD)
    backend.check(cfg)
    backend.init(cfg)
    model = build_model(cfg.model, seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    mixer = Mixer(cfg, store, rank=rank, world_size=WORLD)
    backend.setup(model, build_optimizer(model, cfg), lambda s: 1e-3, cfg)
    patch = apply_megamix(backend.model, mixer)
    backend.before_step(0)
    head = backend.model.lm_head.weight
    snapshots = []
    micro = mixer.next_step()
    for batch in micro:
        patch.set_batch(batch)
        loss = backend.module(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              shift_labels=batch.labels).loss
        backend.backward(loss, len(micro))
        snapshots.append(head.grad.clone())
    gathered = [torch.zeros_like(snapshots[0]) for _ in range(WORLD)]
    torch.distributed.all_gather(gathered, snapshots[0])
    first_step_local = not torch.equal(gathered[0], gathered[1])
    torch.distributed.all_gather(gathered, snapshots[-1])
    last_step_equal = torch.equal(gathered[0], gathered[1])
    # reference: one process, the whole global batch (4 micro-batches of 2), fresh model with the same seed
    ref_model = build_model(cfg.model, seed=0)
    ref_mixer = Mixer(cfg, store, rank=0, world_size=1)
    ref_patch = apply_megamix(ref_model, ref_mixer)
    ref_micro = ref_mixer.next_step()
    for batch in ref_micro:
        ref_patch.set_batch(batch)
        (ref_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   shift_labels=batch.labels).loss / len(ref_micro)).backward()
    ref = ref_model.lm_head.weight.grad
    body = dict(backend.model.named_parameters())["transformer.h.0.mlp.c_fc.weight"].grad
    ref_body = dict(ref_model.named_parameters())["transformer.h.0.mlp.c_fc.weight"].grad
    err = float((snapshots[-1] - ref).abs().max() / ref.abs().max())
    body_err = float((body - ref_body).abs().max() / ref_body.abs().max())
    backend.optimizer.zero_grad(set_to_none=True)
    patch.remove()
    return {"first_step_local": first_step_local, "last_step_equal": last_step_equal, "head_rel_err": err,
            "body_rel_err": body_err, "n_micro": len(micro)}


def _worker(rank: int, port: int, data_dir: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    from megamix.train.backend import make_backend
    from megamix.train.loop import train

    out = {"grad": _grad_check(rank, _cfg(data_dir, f"{root}/unused"), f"{data_dir}/tokens")}
    runs = (("A", (), {}), ("B1", (), {"stop_at_step": 3}), ("B2", (), {}),
            ("C", ("train.loss_impl=capture", "train.steps=2"), {}))
    for name, extra, kw in runs:
        cfg = _cfg(data_dir, f"{root}/{name[0]}", *extra)
        backend = make_backend(cfg, rank, WORLD)
        r = train(cfg, backend=backend, progress=False, log_to_stdout=False, **kw)
        out[name] = {"losses": r.step_losses, "weights": r.weights, "history": r.weight_history, "start": r.start_step,
                     "steps": r.steps, "valid": r.valid_loss, "backend": r.backend, "world": r.world_size,
                     "params": _param_digest(backend.model), "path": r.lm_head_path}
    Path(root, f"rank{rank}.json").write_text(json.dumps(out))


def test_ddp_two_ranks_matches_single_process_and_resumes_exactly(tmp_path, tiny_store):

    from megamix.train.loop import train

    data_dir = str(tiny_store.parent)
    spawn(_worker, (_free_port(), data_dir, str(tmp_path)), WORLD)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))

    # no_sync on the first micro-step, all-reduce on the last; head (tied embedding) and body gradients equal
    # the single-process gradient of the whole global batch
    for g in (r0["grad"], r1["grad"]):
        assert g["n_micro"] == 2 and g["first_step_local"] and g["last_step_equal"]
        assert g["head_rel_err"] < 1e-5 and g["body_rel_err"] < 1e-5, g

    a = r0["A"]
    assert a["backend"] == "ddp" and a["world"] == 2 and a["path"] == "fused"
    assert a["params"] == r1["A"]["params"], "parameters differ across ranks"
    assert a["history"] == r1["A"]["history"] and len(a["history"]) >= 2
    # the plain backend over the same global batches (4 micro-steps of 2 instead of 2 ranks x 2)
    plain = train(_cfg(data_dir, str(tmp_path / "plain")), progress=False, log_to_stdout=False)
    np.testing.assert_allclose(a["losses"], plain.step_losses, rtol=2e-5)
    names = sorted(plain.valid_loss)
    np.testing.assert_allclose([a["valid"][d] for d in names], [plain.valid_loss[d] for d in names], rtol=2e-5)
    for (s1, w1), (s2, w2) in zip(a["history"], plain.weight_history):
        assert s1 == s2
        np.testing.assert_allclose(w1, w2, atol=1e-6)

    # exact resume: stopped at step 3 (mid-round), resumed to 4: bit-identical losses, weights, parameters
    b1, b2 = r0["B1"], r0["B2"]
    assert b1["steps"] == 3 and b2["start"] == 3
    assert b1["losses"] + b2["losses"] == a["losses"]
    assert b2["history"] == a["history"] and b2["weights"] == a["weights"] and b2["valid"] == a["valid"]
    assert b2["params"] == a["params"] == r1["B2"]["params"]

    # the capture LM-head path (hook on the DDP-wrapped model) trains the same model as the fused one
    c = r0["C"]
    assert c["path"] == "capture" and c["params"] == r1["C"]["params"]
    np.testing.assert_allclose(c["losses"], a["losses"][:2], rtol=1e-5)
    assert c["history"][-1][0] == a["history"][1][0] == 2
    np.testing.assert_allclose(c["history"][-1][1], a["history"][1][1], atol=1e-4)

    # one layout: model.pt once (rank 0), a side file per rank, `latest`; one metrics file, one result
    ck = tmp_path / "A" / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000004"
    assert sorted(p.name for p in (ck / "step_0000004").iterdir()) == sorted(
        [SIDE_FILE.format(rank=0), SIDE_FILE.format(rank=1), DONE_FILE.format(rank=0), DONE_FILE.format(rank=1),
         CONFIG_COPY, "model.pt"])
    assert json.loads((tmp_path / "A" / "result.json").read_text())["backend"] == "ddp"

    # the mixture telemetry of rank 0 counts both ranks' samples: the same per-domain tokens as the single
    # process drawing the whole global batch, summing to steps x global batch x seq_len
    def tokens(run_dir):
        return {r["step"]: r["tokens"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"}

    ddp_tok, plain_tok = tokens(tmp_path / "A"), tokens(tmp_path / "plain")
    assert ddp_tok == plain_tok and sorted(ddp_tok) == [1, 2, 3, 4]
    assert all(sum(v.values()) == s * 8 * 32 for s, v in ddp_tok.items())


def test_make_backend_picks_ddp_and_checks_geometry(tiny_store, tmp_path):
    from megamix.train.backend import DDPBackend, DeepSpeedBackend, PlainBackend, make_backend

    cfg = _cfg(str(tiny_store.parent), str(tmp_path))
    assert type(make_backend(cfg, 0, 1)) is PlainBackend
    assert type(make_backend(cfg, 1, 2)) is DDPBackend
    ds = MegamixConfig.from_yaml(None, _overrides(str(tiny_store.parent), str(tmp_path)) + ["deepspeed.enabled=true"])
    assert type(make_backend(ds, 1, 2)) is DeepSpeedBackend
    notes = DDPBackend(0, 2).check(cfg)
    assert "2 accumulation micro-step(s)" in notes[0] and "gloo" in notes[0]
    bad = _cfg(str(tiny_store.parent), str(tmp_path), "train.global_batch_size=6")
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size x world size \(2 x 2 = 4\)"):
        DDPBackend(0, 2).check(bad)


def test_torchrun_without_deepspeed_trains_data_parallel(tiny_store, tmp_path):
    """`torchrun --nproc_per_node 2 -m megamix train` (deepspeed.enabled=false): one DDP run, not two copies
    racing on one out_dir; log lines from rank 0 only (stdout is a pipe, not a terminal)."""
    out = tmp_path / "run"
    sets = [a for o in _overrides(str(tiny_store.parent), str(out)) + ["train.steps=2"] for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megamix", "train", *sets]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["backend"] == "ddp" and res["world_size"] == 2 and res["steps"] == 2
    lines = [x for x in p.stdout.splitlines() if x.startswith("train[ddp x2] step ")]
    assert [x.split(" (")[0] for x in lines] == ["train[ddp x2] step 1/2", "train[ddp x2] step 2/2"], p.stdout
    assert "\r" not in p.stdout + p.stderr
    ck = out / "checkpoints" / "step_0000002"
    assert sorted(x.name for x in ck.iterdir()) == sorted(
        [SIDE_FILE.format(rank=0), SIDE_FILE.format(rank=1), DONE_FILE.format(rank=0), DONE_FILE.format(rank=1),
         CONFIG_COPY, "model.pt"])
    runs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs if r["kind"] == "train"] == [1, 2]


def test_multi_process_launch_without_rendezvous_is_a_clear_error(monkeypatch, capsys):
    """srun-style environment (SLURM_NTASKS=2) without MASTER_ADDR/MASTER_PORT: one line naming the fix, exit 2."""
    from megamix.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert main(["train", "--config", "configs/tiny-cpu.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MASTER_ADDR/MASTER_PORT are not set" in err

"""The one training loop on the DeepSpeed backend: 2-rank gloo runs on CPU (ZeRO 0-3) with online mixing.

Checked: weights identical on all ranks; round statistics equal a single-process run over the same
global batches; exact resume from a checkpoint; the fused LM head under ZeRO-3 with tied embeddings;
held-out gradients (mixing.eval_grad_batches); the PNG report and the recorded LM-head path; training
unchanged by attaching the capture to your own DeepSpeed loop; step-time overhead.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from megamix.config import MegamixConfig  # noqa: E402
from megamix.configbase import ConfigError  # noqa: E402
from megamix.integrations.deepspeed import build_ds_config, gradient_accumulation_steps, validate_launch  # noqa: E402
from ranks import free_port as _free_port, spawn

WORLD = 2



def _cfg(data_dir: str, out_dir: str, zero: int, *extra: str) -> MegamixConfig:
    over = [f"data.data_dir={data_dir}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.seq_len=32", "model.vocab_size=50257", "train.steps=6", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.lr=0.003", "train.warmup_steps=2", "train.eval_every=0",
            "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=0", f"train.out_dir={out_dir}",
            "train.threads=1", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
            "mixing.update_every=2", "mixing.min_weight=0.02", "deepspeed.enabled=true",
            f"deepspeed.zero_stage={zero}"]
    return MegamixConfig.from_yaml(None, overrides=over + list(extra)).validate()


def _setup_rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)


def _resume_worker(rank: int, port: int, zeros: list[int], data_dir: str, root: str, extra: tuple = ()) -> None:
    """For each ZeRO stage: uninterrupted run A; run B stops at step 3 (mid-round) and resumes."""
    _setup_rank(rank, port)
    from megamix.train.loop import train

    for zero in zeros:
        res = {}
        d = f"{root}/z{zero}"

        def run(name, **kw):
            return train(_cfg(data_dir, f"{d}/{name}", zero, *extra), rank=rank, world_size=WORLD, progress=False,
                         log_to_stdout=False, **kw)

        a, b1, b2 = run("A"), run("B", stop_at_step=3), run("B")
        for name, r in (("A", a), ("B1", b1), ("B2", b2)):
            res[name] = {"losses": r.step_losses, "weights": r.weights, "history": r.weight_history,
                         "start": r.start_step, "steps": r.steps, "valid": r.valid_loss, "path": r.lm_head_path,
                         "backend": r.backend}
        Path(d, f"resume_rank{rank}.json").write_text(json.dumps(res))


def _run_resume(tmp_path: Path, tiny_store: Path, zeros: list[int], extra: tuple = ()) -> dict:
    """Runs all stages in one 2-process spawn (one import / process-group setup); results per stage."""
    spawn(_resume_worker, (_free_port(), zeros, str(tiny_store.parent), str(tmp_path), extra), WORLD)
    out = {}
    for z in zeros:
        root = tmp_path / f"z{z}"
        out[z] = {r: json.loads((root / f"resume_rank{r}.json").read_text()) for r in range(WORLD)} | {"root": root}
    return out


def _check_resume(res: dict, path: str = "fused") -> None:
    r0, r1 = res[0], res[1]
    assert r0["A"]["backend"] == "deepspeed" and r0["A"]["path"] == path
    assert json.loads((res["root"] / "A" / "result.json").read_text())["lm_head_path"] == path
    assert (res["root"] / "A" / "curves.png").stat().st_size > 10_000
    # identical weights (and weight history) on all ranks
    assert r0["A"]["history"] == r1["A"]["history"]
    assert r0["A"]["weights"] == r1["A"]["weights"]
    assert len(r0["A"]["history"]) >= 2, "the strategy never changed the weights"
    # exact resume: run B (stopped at 3, resumed) matches run A step for step
    a = r0["A"]["losses"]
    assert r0["B1"]["steps"] == 3 and r0["B2"]["start"] == 3
    assert r0["B1"]["losses"] + r0["B2"]["losses"] == a
    assert r0["B2"]["history"] == r0["A"]["history"]
    assert r0["B2"]["weights"] == r0["A"]["weights"]
    assert r0["B2"]["valid"] == r0["A"]["valid"]
    assert all(np.isfinite(a))


def _single_process_reference(cfg: MegamixConfig, store_dir: Path, steps: int) -> list:
    """Plain-torch single process over the same global batches; returns the mixing snapshots."""
    from megamix.data.store import TokenStore
    from megamix.integrations import attach
    from megamix.mixer import Mixer
    from megamix.train.loop import build_optimizer, lr_at
    from megamix.train.model import build_model

    torch.manual_seed(cfg.train.seed)
    store = TokenStore(store_dir)
    model = build_model(cfg.model, seed=cfg.train.seed)
    mixer = Mixer(cfg, store, rank=0, world_size=1)
    opt = build_optimizer(model, cfg)
    hook = attach(model, mixer, dp_world_size=1, auto_step=False)
    V = cfg.model.vocab_size
    snaps = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        micro = mixer.next_step()
        for batch in micro:
            hook.set_batch(batch)
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            tok = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), batch.labels.reshape(-1),
                                                    reduction="none").reshape(batch.labels.shape)
            hook.record_loss(tok, batch.labels)
            (tok.sum() / (batch.labels != -100).sum() / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        up = hook.after_optimizer_step(step)
        if up is not None:
            snaps.append(up["snapshot"])
    hook.remove()
    return snaps


def _check_stats_vs_single_process(res: dict, tiny_store: Path, zero: int) -> None:
    recs = [json.loads(x) for x in (res["root"] / "A" / "metrics.jsonl").read_text().splitlines()]
    mixing = [r for r in recs if r["kind"] == "mixing"]
    assert [m["step"] for m in mixing] == [2, 4, 6]
    cfg = _cfg(str(tiny_store.parent), str(res["root"] / "ref"), zero)
    snaps = _single_process_reference(cfg, tiny_store, steps=2)
    ref = snaps[0]
    got = mixing[0]
    names = ref.domain_names
    assert [got["counts"][d] for d in names] == ref.counts.tolist()
    np.testing.assert_allclose(np.array(got["gram"]), ref.gram, rtol=2e-3, atol=1e-12 + 1e-4 * np.abs(ref.gram).max())
    loss = np.array([got["domain_train_loss"][d] if got["domain_train_loss"][d] is not None else np.nan
                     for d in names], dtype=float)
    np.testing.assert_allclose(loss, ref.domain_loss, rtol=1e-4)


def _check_matches_plain_backend(res: dict, plain) -> None:
    """The same run on the plain single-process backend (same global batches, 4 micro-steps instead of
    2 ranks x 2): the losses of every step and the final validation losses agree to fp32 round-off, so the
    DeepSpeed path trains the same model (a missing or doubled LM-head gradient would show at step 2)."""
    a = res[0]["A"]
    np.testing.assert_allclose(a["losses"], plain.step_losses, rtol=2e-5)
    names = sorted(plain.valid_loss)
    np.testing.assert_allclose([a["valid"][d] for d in names], [plain.valid_loss[d] for d in names], rtol=2e-5)


def test_deepspeed_two_ranks_zero1_zero3_fused_tied_resume_and_stats(tmp_path, tiny_store):
    """The default path: the fused LM head (tied GPT-2 embeddings, 2 accumulation micro-steps per rank) on
    ZeRO-1 and on ZeRO-3, where the head weight is partitioned and registered with DeepSpeed."""
    from megamix.train.loop import train

    t0 = time.time()
    res = _run_resume(tmp_path, tiny_store, [1, 3])
    plain = train(_cfg(str(tiny_store.parent), str(tmp_path / "plain"), 1, "deepspeed.enabled=false"),
                  progress=False, log_to_stdout=False)
    assert plain.backend == "plain" and plain.lm_head_path == "fused"
    for zero in (1, 3):
        _check_resume(res[zero])
        _check_stats_vs_single_process(res[zero], tiny_store, zero)
        _check_matches_plain_backend(res[zero], plain)
    print(f"ZeRO-1 + ZeRO-3: 2-rank runs took {time.time() - t0:.1f}s")


@pytest.mark.slow
def test_deepspeed_zero0_zero2_resume_and_stats(tmp_path, tiny_store):
    res = _run_resume(tmp_path, tiny_store, [0, 2])
    for zero in (0, 2):
        _check_resume(res[zero])
        _check_stats_vs_single_process(res[zero], tiny_store, zero)


def _runs_worker(rank: int, port: int, data_dir: str, root: str, runs: list) -> None:
    """Run each ``(name, zero, overrides, train kwargs)`` through the loop; results to <root>/<name>_rankR.json."""
    _setup_rank(rank, port)
    from megamix.train.loop import train

    for name, zero, extra, kw in runs:
        r = train(_cfg(data_dir, f"{root}/{name}", zero, *extra), rank=rank, world_size=WORLD, progress=False,
                  log_to_stdout=False, **kw)
        Path(root, f"{name}_rank{rank}.json").write_text(json.dumps(
            {"losses": r.step_losses, "weights": r.weights, "history": r.weight_history, "valid": r.valid_loss,
             "path": r.lm_head_path, "start": r.start_step}))


def _spawn_runs(tmp_path: Path, tiny_store: Path, runs: list) -> dict:
    spawn(_runs_worker, (_free_port(), str(tiny_store.parent), str(tmp_path), runs), WORLD)
    return {name: [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(WORLD)]
            for name, *_ in runs}


def test_deepspeed_zero3_untied_held_out_gradients_match_plain(tmp_path, tiny_store):
    """ZeRO-3, untied LM head, R&B on held-out gradients (mixing.eval_grad_batches, which gathers the
    partitioned head weight at each update): same losses and the same weight history as the plain backend."""
    from megamix.train.loop import train

    extra = ("model.tie_embeddings=false", "mixing.eval_grad_batches=1", "train.steps=4", "mixing.rnb_lambda=5")
    res = _spawn_runs(tmp_path, tiny_store, [("z3", 3, extra, {})])["z3"]
    assert res[0]["history"] == res[1]["history"] and len(res[0]["history"]) >= 2
    plain = train(_cfg(str(tiny_store.parent), str(tmp_path / "plain"), 1, "deepspeed.enabled=false", *extra),
                  progress=False, log_to_stdout=False)
    np.testing.assert_allclose(res[0]["losses"], plain.step_losses, rtol=2e-5)
    assert len(plain.weight_history) == len(res[0]["history"])
    for (s_ds, w_ds), (s_pl, w_pl) in zip(res[0]["history"], plain.weight_history):
        assert s_ds == s_pl
        np.testing.assert_allclose(w_ds, w_pl, atol=1e-6)


def test_deepspeed_bf16_fused_and_capture_paths(tmp_path, tiny_store):
    """bf16 engine (bf16 params, fp32 master weights), ZeRO-3 and ZeRO-2: the fused head runs in bf16 and
    resumes exactly; the capture path (train.loss_impl=capture) records its path and trains alike."""
    bf = ("train.dtype=bf16",)
    runs = [("fz3", 3, bf, {}), ("fz3b", 3, bf, {"stop_at_step": 3}), ("fz3b", 3, bf, {}),
            ("cz2", 2, bf + ("train.loss_impl=capture",), {}), ("fz2", 2, bf, {})]
    res = _spawn_runs(tmp_path, tiny_store, runs)
    full, resumed = res["fz3"][0], res["fz3b"][0]
    assert full["path"] == "fused" and res["cz2"][0]["path"] == "capture"
    assert resumed["start"] == 3 and resumed["losses"] == full["losses"][3:]
    assert resumed["weights"] == full["weights"] and resumed["history"] == full["history"]
    assert res["fz3"][0]["history"] == res["fz3"][1]["history"]
    assert all(np.isfinite(full["losses"]))
    # the same bf16 model trained through the fused head and through HF's logits + CE (capture): bf16
    # rounding differs between the two, so agreement is to a few parts in a thousand
    np.testing.assert_allclose(res["fz2"][0]["losses"], res["cz2"][0]["losses"], rtol=2e-2)


def _attach_worker(rank: int, port: int, data_dir: str, root: str, steps: int, repeats: int = 1,
                   extra: tuple = ()) -> None:
    """Own loop with attach(engine, mixer): parameters bit-identical with and without megamix; timing."""
    _setup_rank(rank, port)
    from megamix.data.store import TokenStore
    from megamix.integrations import attach
    from megamix.mixer import Mixer
    from megamix.train.backend import DeepSpeedBackend
    from megamix.train.loop import build_optimizer, lr_at
    from megamix.train.model import build_model

    cfg = _cfg(data_dir, f"{root}/own", 1, "mixing.strategy=static", f"train.steps={steps}", *extra)
    store = TokenStore(Path(data_dir) / "tokens")
    V = cfg.model.vocab_size
    out = {}
    for with_megamix in (False, True) * repeats:
        torch.manual_seed(0)
        backend = DeepSpeedBackend(rank, WORLD)
        backend.init(cfg)
        model = build_model(cfg.model, seed=0)
        backend.setup(model, build_optimizer(model, cfg), lambda s: lr_at(s, cfg), cfg)
        engine = backend.engine
        mixer = Mixer(cfg, store, rank=rank, world_size=WORLD)
        hook = attach(engine, mixer) if with_megamix else None
        if hook is not None:
            assert attach(engine, mixer) is hook  # idempotent
        times = []
        for step in range(steps):
            ts = time.perf_counter()
            for batch in mixer.next_step():
                if hook is not None:
                    hook.set_batch(batch)
                logits = engine(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), batch.labels.reshape(-1))
                engine.backward(loss)
                engine.step()  # with megamix: mixer.step runs inside at the accumulation boundary
            if hook is None:
                mixer.step(step)
            times.append(time.perf_counter() - ts)
        params = torch.cat([p.detach().reshape(-1).float() for p in engine.module.parameters()])
        key = "megamix" if with_megamix else "plain"
        out.setdefault(key, {"times": [], "params": params})
        out[key]["times"] += times[1:]  # drop the first (warm-up) step
        assert torch.equal(out[key]["params"], params)
        if hook is not None:
            assert hook.micro_steps == steps * 2  # 2 accumulation micro-steps per step
            hook.remove()
    torch.save(out, Path(root) / f"attach_rank{rank}.pt")


def test_deepspeed_attach_grads_unchanged_and_overhead(tmp_path, tiny_store):
    steps = 6
    spawn(_attach_worker, (_free_port(), str(tiny_store.parent), str(tmp_path), steps), WORLD)
    r = [torch.load(tmp_path / f"attach_rank{k}.pt") for k in range(WORLD)]
    for k in range(WORLD):
        assert torch.equal(r[k]["plain"]["params"], r[k]["megamix"]["params"]), "megamix changed training"
    assert torch.equal(r[0]["megamix"]["params"], r[1]["megamix"]["params"])
    plain = float(np.median(r[0]["plain"]["times"]))
    mm = float(np.median(r[0]["megamix"]["times"]))
    rep = {"plain_step_s": plain, "megamix_step_s": mm, "overhead_pct": 100 * (mm / plain - 1),
           "model": "GPT-2 1 layer d32 vocab 50257, seq 32, global batch 8 (2 ranks x 2 micro x 2)",
           "k": 32}
    (tmp_path / "overhead.json").write_text(json.dumps(rep))
    print("DeepSpeed ZeRO-1 CPU step-time overhead:", rep)
    assert np.isfinite(mm) and mm > 0


# ------------------------------------------------------------------------------------- launch validation
def test_validate_launch_geometry_and_errors(tmp_path):
    cfg = _cfg("data", str(tmp_path), 2)
    info = validate_launch(cfg, 2)
    assert info["gradient_accumulation_steps"] == 2
    ds = info["ds_config"]
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    assert gradient_accumulation_steps(cfg, 4) == 1
    with pytest.raises(ConfigError, match="divisible"):
        validate_launch(cfg, 3)
    with pytest.raises(ConfigError, match="divisible"):
        validate_launch(_cfg("data", str(tmp_path), 1, "train.global_batch_size=6"), 2)
    with pytest.raises(ConfigError, match="zero_stage"):
        _cfg("data", str(tmp_path), 4)
    with pytest.raises(ConfigError, match="offload"):
        validate_launch(_cfg("data", str(tmp_path), 0, "deepspeed.offload_optimizer=true"), 2)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="nccl"):
            validate_launch(_cfg("data", str(tmp_path), 1, "deepspeed.backend=nccl"), 2)
    with pytest.raises(ConfigError, match="deepspeed.enabled"):
        validate_launch(_cfg("data", str(tmp_path), 1, "deepspeed.enabled=false"), 2)
    bf = build_ds_config(_cfg("data", str(tmp_path), 3, "train.dtype=bf16"), 2)
    assert bf["bf16"]["enabled"] is True and bf["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("path,world", [("configs/gpt-125m.yaml", 8), ("configs/gpt-1b.yaml", 16)])
def test_gpu_configs_validate(path, world):
    root = Path(__file__).resolve().parents[1]
    cfg = MegamixConfig.from_yaml(root / path)
    info = validate_launch(cfg, world, check_devices=False)
    assert info["gradient_accumulation_steps"] >= 1
    assert cfg.deepspeed.enabled and cfg.train.dtype == "bf16"


@pytest.mark.slow
def test_deepspeed_overhead_benchmark(tmp_path, tiny_store):
    """Step-time overhead on the tiny-cpu model shape (GPT-2 2x128, seq 128, vocab 50257), ZeRO-1, 2 ranks,
    global batch 16 = 2 ranks x micro 4 x 2 accumulation; k = 32x16. Interleaved plain/megamix runs."""
    extra = ("model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.seq_len=128",
             "train.global_batch_size=16", "train.micro_batch_size=4", "projection.k1=32", "projection.k2=16")
    steps, repeats = 8, 2
    spawn(_attach_worker, (_free_port(), str(tiny_store.parent), str(tmp_path), steps, repeats, extra), WORLD)
    r = torch.load(tmp_path / "attach_rank0.pt")
    plain = float(np.median(r["plain"]["times"]))
    mm = float(np.median(r["megamix"]["times"]))
    print(f"\nZeRO-1 2-rank CPU, GPT-2 2x128 seq128 gbs16, k=512: plain {plain:.3f}s/step, megamix {mm:.3f}s/step, "
          f"overhead {100 * (mm / plain - 1):+.1f}% (median of {len(r['plain']['times'])} steps each)")
    assert torch.equal(r["plain"]["params"], r["megamix"]["params"])

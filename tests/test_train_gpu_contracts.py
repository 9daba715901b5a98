"""GPU contracts of the training paths, seen on a CPU (tests/devicesim.py).

- **Sync budget of the loop** (plain backend, R&B and DoGraph): megamix's code makes no host sync inside a
  micro-step, exactly one per optimizer step (the step report: the loss averaged over ranks, the gradients'
  finiteness, a stop request and the gradient norm, read together) and one device-to-host copy per mixing round.
  Syncs inside transformers' model body (its packed-sequence check reads ``position_ids``) and torch's AdamW are
  reported, not budgeted.
- **The head in the autocast dtype** on the plain loop (``train.dtype=bf16``), the Hugging Face patch under
  ``torch.autocast`` and the HF Trainer with ``bf16=True``: the LM head's GEMMs (those touching both V and d) get
  bf16 operands, as the model's own ``nn.Linear`` head would under autocast.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devicesim import DeviceSim


def _loop_cfg(store_dir: Path, out: Path, strategy: str, *extra):
    from megamix.config import MegamixConfig

    return MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={store_dir.parent}", "model.seq_len=16", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=6",
        "train.log_every=3", "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0",
        f"train.out_dir={out}", "train.resume=false", f"mixing.strategy={strategy}", "mixing.update_every=2",
        f"projection.k1={K1}", f"projection.k2={K2}", "logging.tensorboard=false", "train.threads=1",
        *extra]).validate()


def _instrument(monkeypatch, sim: DeviceSim) -> dict:
    """Label the loop's regions: ``m<step>`` (a micro-step's forward + backward), ``r<step>`` (Mixer.step),
    ``s<step>`` (the rest of the step), ``o<step>`` (the optimizer's own step), ``eval``, ``ckpt``, ``setup``."""
    from megamix.mixer import Mixer
    from megamix.train import loop as L
    from megamix.train.backend import PlainBackend
    from megamix.train.checkpoint import Checkpoints

    cur = {"step": -1}
    setup, before = PlainBackend.setup, PlainBackend.before_step

    def _setup(self, model, *a, **k):
        setup(self, model, *a, **k)
        sim.mark(self.model)

    def _before(self, step):
        cur["step"] = step
        sim.label = f"s{step}"
        return before(self, step)

    def labelled(fn, label):
        def run(*a, **k):
            with sim.region(label() if callable(label) else label):
                return fn(*a, **k)
        return run

    monkeypatch.setattr(PlainBackend, "setup", _setup)
    monkeypatch.setattr(PlainBackend, "before_step", _before)
    monkeypatch.setattr(L.LMHead, "loss", labelled(L.LMHead.loss, lambda: f"m{cur['step']}"))
    monkeypatch.setattr(Mixer, "step", labelled(Mixer.step, lambda: f"r{cur['step']}"))
    monkeypatch.setattr(torch.optim.AdamW, "step", labelled(torch.optim.AdamW.step, lambda: f"o{cur['step']}"))
    import megamix.train.callbacks as C
    monkeypatch.setattr(C, "evaluate", labelled(C.evaluate, "eval"))
    monkeypatch.setattr(Checkpoints, "save", labelled(Checkpoints.save, "ckpt"))
    return cur


@pytest.mark.parametrize("strategy", ["rnb", "dograph"])
def test_the_loop_keeps_the_sync_budget(tiny_store, tmp_path, monkeypatch, strategy):
    from megamix.train import loop as L

    cfg = _loop_cfg(tiny_store, tmp_path / "run", strategy)
    sim = DeviceSim()
    _instrument(monkeypatch, sim)
    with sim, sim.region("setup"):
        res = L.train(cfg, progress=False, log_to_stdout=False)
    steps = cfg.train.steps
    for s in range(steps):
        micro = sim.count("sync", f"m{s}", owner="megamix")
        assert micro == 0, f"step {s}: {micro} syncs in megamix's micro-step code\n" + sim.explain("sync", f"m{s}")
        per_step = sim.count("sync", f"s{s}", owner="megamix")
        assert per_step == 1, f"step {s}: {per_step} host reads, budget 1\n" + sim.explain("sync", f"s{s}")
    rounds = [s for s in range(steps) if (s + 1) % cfg.mixing.update_every == 0]
    for s in rounds:
        assert sim.count("d2h", f"r{s}") == 1, sim.explain("d2h", f"r{s}")
        assert sim.count("sync", f"r{s}", owner="megamix") == 1, sim.explain("sync", f"r{s}")
    # what other code does is reported, not budgeted: transformers' body and torch's optimizer
    others = sim.count("sync", owner="third-party")
    print(f"\n{strategy}: megamix syncs per micro-step 0, per step 1, per round 1 d2h; third-party syncs in the run: "
          f"{others} ({dict(sim.summary().get('sync', {}))})")
    assert all(x == x for x in res.step_losses) and len(res.step_losses) == steps


K1, K2 = 24, 12      # projection sizes no model dimension shares, so the statistics' fp32 GEMMs can be told apart


def _check_bf16(sim: DeviceSim, V: int, d: int, n_head_calls: int) -> None:
    """Every GEMM but the statistics' (u = δ P1ᵀ, w = a P2ᵀ, g_i: an operand of size k1 or k2, fp32 by design) got
    bf16 operands: the body's, and the head's logits, dX and dW (dW in blocks of rows accumulated into fp32)."""
    stats = [g for g in sim.gemms if g.touches(K1) or g.touches(K2)]
    rest = [g for g in sim.gemms if g not in stats]
    wrong = [g for g in rest if set(g.dtypes) != {"bfloat16"}]
    assert not wrong, wrong
    head = [g for g in rest if g.touches(V) and g.touches(d)]          # logits and dX of each head call
    assert len(head) >= 2 * n_head_calls, head
    assert all(set(g.dtypes) == {"float32"} for g in stats if g.op == "bmm"), "statistics must stay fp32"


def test_the_plain_loop_runs_the_head_in_bf16_under_train_dtype_bf16(tiny_store, tmp_path):
    from megamix.train import loop as L

    cfg = _loop_cfg(tiny_store, tmp_path / "run", "rnb", "train.dtype=bf16", "train.steps=2", "train.log_every=1",
                    "train.eval_batches=1")
    sim = DeviceSim(keep_stacks=False)
    with sim:
        L.train(cfg, progress=False, log_to_stdout=False)
    _check_bf16(sim, cfg.model.vocab_size, cfg.model.n_embd, n_head_calls=2 * 2)   # 2 steps x 2 micro-batches


def _hf_model(vocab: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _mixer(tiny_store, micro=2, n_micro=4):
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={tiny_store.parent}", "model.seq_len=32", f"train.global_batch_size={micro * n_micro}",
        f"train.micro_batch_size={micro}", f"projection.k1={K1}", f"projection.k2={K2}", "mixing.strategy=rnb",
        "mixing.update_every=2"]).validate()
    store = TokenStore(tiny_store)
    return Mixer(cfg, store), store


def test_the_hf_patch_runs_the_head_in_the_autocast_dtype(tiny_store):
    from megamix.integrations.hf import apply_megamix

    mixer, store = _mixer(tiny_store)
    V = store.vocab_size
    model = _hf_model(V)
    patch = apply_megamix(model, mixer)
    sim = DeviceSim(keep_stacks=False)
    with sim:
        for batch in mixer.next_step()[:1]:
            patch.set_batch(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids, shift_labels=batch.labels).loss
            loss.backward()
    _check_bf16(sim, V, 32, n_head_calls=1)
    assert model.lm_head.weight.grad.dtype == torch.float32
    patch.remove()


def test_the_hf_trainer_with_bf16_runs_the_head_in_bf16(tiny_store, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from megamix.integrations.hf import apply_megamix
    from megamix.integrations.hf_trainer import MegamixTrainer

    mixer, store = _mixer(tiny_store)
    V = store.vocab_size
    model = _hf_model(V)
    apply_megamix(model, mixer)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=4,
        learning_rate=1e-3, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, bf16=True)
    trainer = MegamixTrainer(mixer=mixer, model=model, args=args)
    sim = DeviceSim(keep_stacks=False)
    with sim:
        trainer.train()
    _check_bf16(sim, V, 32, n_head_calls=4)   # the 4 accumulation micro-batches

"""megamix.integrations.hf_trainer: a real transformers.Trainer on a tiny Llama on CPU.

- resume: train 4 steps straight vs. 3 steps (checkpoint-3, mid mixing round) + a new Trainer, Mixer and a
  differently initialised model resumed from it: the same sample stream, exactly; the same weight history,
  exactly; the same losses and parameters;
- the Trainer equals a hand-written loop over the same pieces (MegamixFeed, capture path): gradient
  accumulation steps are megamix micro-batches and the loss is scaled as in megamix's own loop;
- misuse: one-line errors that name the argument and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from megamix.config import MegamixConfig  # noqa: E402
from megamix.configbase import ConfigError  # noqa: E402
from megamix.data.store import TokenStore  # noqa: E402
from megamix.integrations.hf import apply_megamix  # noqa: E402
from megamix.integrations.hf_trainer import (BATCH_KEY, MegamixFeed, MegamixTrainer, load_state,  # noqa: E402
                                             save_state)
from megamix.mixer import Mixer  # noqa: E402

MICRO, N_MICRO = 2, 4   # global batch 8 = 2 sequences x 4 accumulation steps x 1 process


def _cfg(store_dir: Path) -> MegamixConfig:
    return MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={store_dir.parent}", "model.seq_len=32", f"train.global_batch_size={MICRO * N_MICRO}",
        f"train.micro_batch_size={MICRO}", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
        "mixing.update_every=2", "mixing.min_weight=0.02"]).validate()


def _model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _args(out: Path, steps: int, **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=MICRO,
                gradient_accumulation_steps=N_MICRO, learning_rate=3e-3, lr_scheduler_type="constant",
                max_grad_norm=0.0, weight_decay=0.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _record_stream(mixer: Mixer) -> list:
    """Wrap the loader so every drawn step's sample ids (per micro-batch) are recorded."""
    stream, draw = [], mixer.loader.next_step

    def next_step():
        batches = draw()
        stream.append([b.sample_ids.tolist() for b in batches])
        return batches

    mixer.loader.next_step = next_step
    return stream


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def store(tiny_store):
    return TokenStore(tiny_store)


def test_resume_from_trainer_checkpoint_continues_exactly(tiny_store, store, tmp_path):
    cfg = _cfg(tiny_store)

    def run(out: Path, seed: int, *, stop: int | None = None, resume: bool = False, save_steps: int = 3):
        mixer = Mixer(cfg, store)
        model = _model(store.vocab_size, seed)
        patch = apply_megamix(model, mixer)
        stream = _record_stream(mixer)
        trainer = MegamixTrainer(mixer=mixer, model=model, args=_args(out, 4, save_strategy="steps",
                                                                      save_steps=save_steps),
                                 callbacks=[_StopAt(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return mixer, model, stream, _losses(trainer), patch

    mix_a, model_a, stream_a, loss_a, patch_a = run(tmp_path / "straight", 0, save_steps=100)
    assert len(stream_a) == 4 and all(len(s) == N_MICRO for s in stream_a)
    assert patch_a.calls == 4 * N_MICRO                           # every micro-batch went through the fused head
    assert [s for s, _ in mix_a.weight_history] == [0, 2, 4]      # K = 2

    out = tmp_path / "interrupted"
    mix_b, _, stream_b, loss_b, _ = run(out, 0, stop=3)
    ckpt = out / "checkpoint-3"
    assert (ckpt / "megamix_rank00000.pt").is_file() and not list(ckpt.glob("*.tmp*"))
    assert mix_b.stats.num_samples > 0                            # stopped mid-round: accumulators were saved
    # a new Trainer, Mixer and model (other init): everything comes back from checkpoint-3
    mix_c, model_c, stream_c, loss_c, _ = run(out, 1, resume=True)

    assert stream_b + stream_c == stream_a                        # the sample stream, exactly
    assert mix_c.weight_history == mix_a.weight_history           # the weights, exactly
    np.testing.assert_allclose([loss_b[1], loss_b[2], loss_b[3], loss_c[4]], [loss_a[s] for s in (1, 2, 3, 4)],
                               rtol=1e-6)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        torch.testing.assert_close(pa, pc, rtol=1e-5, atol=1e-6)


def test_trainer_equals_hand_loop_on_the_same_pieces(tiny_store, store, tmp_path):
    """Capture path (no patch): the Trainer's losses, sample stream and weights equal a plain loop over
    MegamixFeed with the same optimizer: accumulation steps are megamix micro-batches, loss scaled as megamix's."""
    cfg, steps = _cfg(tiny_store), 4
    mixer = Mixer(cfg, store)
    stream_t = _record_stream(mixer)
    trainer = MegamixTrainer(mixer=mixer, model=_model(store.vocab_size), args=_args(tmp_path / "t", steps))
    assert trainer.megamix.path == "capture"
    trainer.train()
    assert trainer.megamix.binding.hook.micro_steps == steps * N_MICRO

    mixer_h = Mixer(cfg, store)
    stream_h = _record_stream(mixer_h)
    model = _model(store.vocab_size)
    feed = MegamixFeed(model, mixer_h)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = {}
    for step in range(steps):
        total = 0.0
        for inputs in feed.micro_batches():
            assert BATCH_KEY in inputs
            loss = model(**inputs).loss
            (loss / N_MICRO).backward()
            total += loss.item() / N_MICRO
        opt.step()
        opt.zero_grad(set_to_none=True)
        feed.step(step)
        losses[step + 1] = total
    feed.remove()
    assert stream_t == stream_h
    assert [s for s, _ in mixer.weight_history] == [0, 2, 4]
    for (s1, w1), (s2, w2) in zip(mixer.weight_history, mixer_h.weight_history, strict=True):
        assert s1 == s2
        np.testing.assert_allclose(w1, w2, rtol=1e-9, atol=1e-12)
    loss_t = _losses(trainer)
    np.testing.assert_allclose([loss_t[s] for s in losses], list(losses.values()), rtol=1e-5)


@pytest.mark.parametrize("over,needle", [
    ({"max_steps": -1}, "TrainingArguments.max_steps=-1"),
    ({"per_device_train_batch_size": 4}, "set per_device_train_batch_size=2"),
    ({"gradient_accumulation_steps": 2}, "set gradient_accumulation_steps=4"),
    ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy='group_by_length'"),
    ({"auto_find_batch_size": True}, "auto_find_batch_size=True"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1"),
    ({"train_dataset": True}, "drop train_dataset="),
    ({"mixer_world": 2}, "rank=args.process_index, world_size=args.world_size"),
])
def test_conflicting_trainer_settings_are_one_line_errors(tiny_store, store, tmp_path, over, needle):
    cfg = _cfg(tiny_store)
    over = dict(over)
    world = over.pop("mixer_world", 1)
    mixer = Mixer(cfg, store, rank=0, world_size=world)
    model = _model(store.vocab_size)
    apply_megamix(model, mixer)
    extra = {"train_dataset": [{"input_ids": torch.zeros(32, dtype=torch.long)}]} if over.pop("train_dataset", 0) \
        else {}
    with pytest.raises(ConfigError) as e:
        MegamixTrainer(mixer=mixer, model=model, args=_args(tmp_path, over.pop("max_steps", 4), **over), **extra)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_state_files_refuse_a_wrong_checkpoint(tiny_store, store, tmp_path):
    cfg = _cfg(tiny_store)
    single = Mixer(cfg, store)
    with pytest.raises(ConfigError, match="holds no megamix state"):
        load_state(single, tmp_path / "checkpoint-7")
    two = [Mixer(cfg, store, rank=r, world_size=2) for r in range(2)]
    for m in two:
        m.next_step()
        assert save_state(m, tmp_path / "ckpt", 1).name == f"megamix_rank{m.rank:05d}.pt"
    assert not list((tmp_path / "ckpt").glob("*.tmp*"))
    with pytest.raises(ConfigError, match="written by a run of 2 processes and this run has 1"):
        load_state(single, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "megamix_rank00000.pt").unlink()
    with pytest.raises(ConfigError, match="mixing state of 1 rank"):
        load_state(single, tmp_path / "ckpt")
    again = Mixer(cfg, store, rank=1, world_size=2)
    assert load_state(again, tmp_path / "ckpt") == 1 and again.loader.step == 1



def test_capture_feed_reads_the_losses_of_bf16_logits_without_an_fp32_copy(tiny_store, store):
    """The Trainer/Accelerate capture path reads each sample's train loss from the model's logits; bf16 logits are
    read a block of rows at a time in fp32, never as a second fp32 copy of the whole [b, T, V] tensor."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from devicesim import peak_allocated

    mixer = Mixer(_cfg(tiny_store), store)
    feed = MegamixFeed(_model(store.vocab_size), mixer)
    batch = mixer.next_step()[0]
    feed.binding.hook.set_batch(batch)
    logits = torch.randn(*batch.labels.shape, store.vocab_size).to(torch.bfloat16)

    class Out:
        pass

    out = Out()
    out.logits = logits
    peak, _ = peak_allocated(lambda: feed._record_loss(None, (), {"shift_labels": batch.labels}, out))
    assert peak < logits.numel() * 4 // 2, f"{peak} bytes: an fp32 copy of the logits is {logits.numel() * 4}"
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100,
                                            reduction="none").view(batch.labels.shape)
    ctx = feed.binding.hook.capture.context
    valid = batch.labels != -100
    assert torch.allclose(ctx["loss_sum"], (ref * valid).sum(1).double(), rtol=1e-6)
    feed.remove()

"""The one-line fused-LM-head patch for Hugging Face causal LMs (megamix.integrations.hf).

For GPT-2, Llama, Mistral, Qwen2 and Qwen3, tied and untied: the patched model's loss and every
parameter gradient match the unpatched model's (HF logits + cross-entropy) within the kernel
tolerance table; the statistics equal the capture path's; the Triton kernel (interpreter) gives the
same; ``shift_labels``, ``num_items_in_batch``, generation without labels, removal and bad input.
"""
from __future__ import annotations

import copy

import pytest
import torch

from megamix.kernels.testing import assert_close

transformers = pytest.importorskip("transformers")

D = 32


def _config(name: str, vocab: int, tied: bool):
    common = dict(vocab_size=vocab, tie_word_embeddings=tied)
    if name == "GPT2LMHeadModel":
        return transformers.GPT2Config(n_embd=D, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, **common)
    llama_like = dict(hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **common)
    if name == "LlamaForCausalLM":
        return transformers.LlamaConfig(**llama_like)
    if name == "MistralForCausalLM":
        return transformers.MistralConfig(sliding_window=None, **llama_like)
    if name == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**llama_like)
    if name == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(head_dim=8, **llama_like)
    raise KeyError(name)


def _model(name: str, vocab: int, tied: bool):
    torch.manual_seed(0)
    m = getattr(transformers, name)(_config(name, vocab, tied))
    m.config._attn_implementation = "eager"
    return m


@pytest.fixture(scope="module")
def store(tiny_store):
    from megamix.data.store import TokenStore
    return TokenStore(tiny_store)


def _mixer(store, *extra):
    from megamix.config import MegamixConfig
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={store.root.parent}", "model.seq_len=16", "train.global_batch_size=4",
        "train.micro_batch_size=4", "projection.k1=8", "projection.k2=4", "mixing.strategy=dograph",
        *extra]).validate()
    return Mixer(cfg, store)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [(c, t) for c in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                          "Qwen3ForCausalLM") for t in (True, False)]


@pytest.mark.parametrize("name,tied", CASES, ids=[f"{c}-{'tied' if t else 'untied'}" for c, t in CASES])
def test_patched_loss_and_grads_match_unpatched(name, tied, store):
    from megamix.integrations.hf import apply_megamix

    mixer = _mixer(store)
    batch = mixer.next_step()[0]
    ref = _model(name, store.vocab_size, tied)
    fused = copy.deepcopy(ref)
    if tied:
        assert fused.get_output_embeddings().weight is fused.get_input_embeddings().weight
    out_ref = ref(input_ids=batch.input_ids, labels=batch.input_ids)
    out_ref.loss.backward()
    patch = apply_megamix(fused, mixer)
    patch.set_batch(batch)
    out = fused(input_ids=batch.input_ids, labels=batch.input_ids)
    assert out.logits is None and patch.calls == 1
    out.loss.backward()
    assert_close(out.loss, out_ref.loss, "loss", torch.float32, "cpu", f"{name} loss")
    g_ref, g = _grads(ref), _grads(fused)
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        assert_close(g[n], g_ref[n], "grad", torch.float32, "cpu", f"{name} grad {n}")
    # statistics were recorded for every sample of the batch, by domain
    assert int(mixer.stats.counts.sum()) == len(batch) and mixer.stats.sums.abs().max() > 0


def test_statistics_equal_the_capture_path_and_triton_kernel(store):
    """Fused patch (torch and Triton-interpreter backends) vs the capture hook on the unpatched model: the
    same per-sample projected gradients (HF semantics: labels shifted inside the model)."""
    from megamix.integrations import attach
    from megamix.integrations.hf import apply_megamix

    rows = {}
    for mode in ("capture", "torch", "triton"):
        mixer = _mixer(store, f"projection.backend={'torch' if mode == 'capture' else mode}")
        batch = mixer.next_step()[0]
        model = _model("LlamaForCausalLM", store.vocab_size, tied=False)
        if mode == "capture":
            hook = attach(model, mixer)
            hook.set_batch(batch)
            model(input_ids=batch.input_ids, labels=batch.input_ids).loss.backward()
            hook.remove()
        else:
            apply_megamix(model, mixer).set_batch(batch)
            model(input_ids=batch.input_ids, labels=batch.input_ids).loss.backward()
        rows[mode] = torch.as_tensor(mixer.stats.snapshot(1, mixer.domains).per_sample)
    assert rows["capture"].abs().max() > 0
    for mode in ("torch", "triton"):
        assert_close(rows[mode], rows["capture"], "proj", torch.float32, "cpu", f"fused[{mode}] vs capture")


def test_shift_labels_num_items_and_generation(store):
    from megamix.integrations.hf import apply_megamix, patched

    mixer = _mixer(store)
    batch = mixer.next_step()[0]
    ref = _model("GPT2LMHeadModel", store.vocab_size, tied=True)
    model = copy.deepcopy(ref)
    patch = apply_megamix(model, mixer)
    assert apply_megamix(model, mixer) is patch and patched(model) is patch       # idempotent
    # megamix's loader labels are already shifted: shift_labels= takes them as they are
    a = model(input_ids=batch.input_ids, shift_labels=batch.labels, domain_ids=batch.domain_ids).loss
    logits = ref(input_ids=batch.input_ids).logits
    b = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1))
    assert_close(a.detach(), b.detach(), "loss", torch.float32, "cpu", "shift_labels")
    # HF Trainer's gradient-accumulation normalisation: sum / num_items_in_batch
    n = 3 * batch.labels.numel()
    patch.set_batch(batch)
    a = model(input_ids=batch.input_ids, labels=batch.input_ids, num_items_in_batch=n).loss
    b = ref(input_ids=batch.input_ids, labels=batch.input_ids, num_items_in_batch=n).loss
    assert_close(a.detach(), b.detach(), "loss", torch.float32, "cpu", "num_items_in_batch")
    # no labels: the original forward (logits for generation / evaluation), unchanged
    with torch.no_grad():
        la = model(input_ids=batch.input_ids).logits
        lb = ref(input_ids=batch.input_ids).logits
    assert torch.equal(la, lb)
    gen = model.generate(batch.input_ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)
    # no domain ids bound while recording statistics: a clear error
    patch.context = None
    with pytest.raises(ValueError, match="domain ids"):
        model(input_ids=batch.input_ids, labels=batch.input_ids)
    patch.remove()
    assert patched(model) is None and "forward" not in vars(model)
    assert model(input_ids=batch.input_ids, labels=batch.input_ids).logits is not None


def test_unsupported_models_are_refused_with_the_alternative(store):
    from megamix.integrations.hf import apply_megamix

    mixer = _mixer(store)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(TypeError, match="attach"):
        apply_megamix(transformers.GPT2Model(cfg), mixer)
    gemma = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with pytest.raises(TypeError, match="attach"):
        apply_megamix(transformers.Gemma2ForCausalLM(gemma), mixer)


def test_patched_forward_shows_the_model_signature(store):
    """The HF Trainer keeps only the dataset columns named in model.forward's signature: the patch must show the
    class forward's parameters (not *args, **kwargs), without a __wrapped__ chain that unwrapping helpers follow."""
    import inspect

    from megamix.integrations.hf import apply_megamix

    model = _model("GPT2LMHeadModel", store.vocab_size, True)
    before = list(inspect.signature(model.forward).parameters)
    patch = apply_megamix(model, _mixer(store))
    assert list(inspect.signature(model.forward).parameters) == before and "input_ids" in before
    assert not hasattr(model.forward.__func__, "__wrapped__")
    patch.remove()

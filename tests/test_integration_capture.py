"""LMHeadGradCapture: exact per-sample projections, unchanged training gradients, idempotent attach."""
from __future__ import annotations

import warnings
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamix.kernels.projection import Projection, project_u, project_w
from megamix.kernels.testing import assert_close
from megamix.integrations.hook import LMHeadGradCapture, find_lm_head

V, D, K1, K2 = 97, 24, 5, 3


class TinyLM(nn.Module):
    def __init__(self, vocab=V, d=D, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.emb.weight

    def hidden(self, ids):
        return self.body(self.emb(ids))

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))


def _proj(seed=0, v=V, d=D):
    g = torch.Generator().manual_seed(seed)
    return Projection(torch.randn(K1, v, generator=g), torch.randn(K2, d, generator=g), kind="gaussian")


def project_per_sample(delta, a, proj):
    """Reference: g_i = Σ_t (P1 δ_t)(P2 a_t)ᵀ with explicit per-sample outer products."""
    u, w = project_u(delta, proj), project_w(a, proj)
    return torch.einsum("btk,btl->bkl", u, w).reshape(delta.shape[0], -1)


def _batch(B=4, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[2, -1] = -100
    return ids, labels


def _exact_per_sample(model, ids, labels, proj):
    """P1 G_i P2ᵀ with G_i = d(L_i)/dW_head from torch.func (L = Σ_i L_i, mean over valid tokens)."""
    n_valid = (labels != -100).sum()
    with torch.no_grad():
        hid = model.hidden(ids)

    def sample_loss(W, h, y):
        z = h @ W.t()
        return F.cross_entropy(z, y, ignore_index=-100, reduction="sum") / n_valid

    G = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(
        model.lm_head.weight.detach(), hid, labels)
    return torch.einsum("kv,bvd,ld->bkl", proj.P1, G, proj.P2).reshape(ids.shape[0], -1)


def test_capture_matches_exact_per_sample_grads():
    torch.manual_seed(0)
    model = TinyLM()
    proj = _proj()
    ids, labels = _batch()
    got = []
    cap = LMHeadGradCapture(model.lm_head, proj, lambda g, ctx: got.append((g, ctx)), chunk_tokens=5)
    cap.set_context("mb0")
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    assert len(got) == 1 and got[0][1] == "mb0"
    g = got[0][0]
    assert g.shape == (4, K1 * K2) and g.dtype == torch.float32
    ref = _exact_per_sample(model, ids, labels, proj)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    # the per-sample rows sum to the projection of the full LM-head gradient
    full = proj.P1 @ model.lm_head.weight.grad @ proj.P2.t()
    torch.testing.assert_close(g.sum(0), full.reshape(-1), rtol=1e-4, atol=1e-6)
    cap.remove()


def test_training_grads_bit_identical_with_capture():
    ids, labels = _batch()

    def run(attach):
        torch.manual_seed(0)
        model = TinyLM(tied=True)
        cap = LMHeadGradCapture(model.lm_head, _proj(), lambda g, c: None) if attach else None
        for _ in range(2):  # two accumulation micro-steps
            loss = F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1)) / 2
            loss.backward()
        if cap:
            assert cap.calls == 2
            cap.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    a, b = run(False), run(True)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_capture_hf_gpt2_tied_and_grad_accumulation():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    head, seq_first = find_lm_head(model)
    assert head is model.lm_head and head.weight is model.transformer.wte.weight and not seq_first
    proj = _proj()
    got = []
    LMHeadGradCapture(head, proj, lambda g, ctx: got.append(g))
    ids, labels = _batch(B=3, T=8)
    hs = {}
    h2 = head.register_forward_hook(lambda m, a, o: hs.__setitem__("a", a[0].detach()))
    out = model(input_ids=ids, labels=ids)
    out.logits.retain_grad()
    (out.loss * 0.5).backward()  # a scaled loss, as under gradient accumulation
    h2.remove()
    ref = project_per_sample(out.logits.grad, hs["a"], proj)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-7)
    # HF shifts labels internally: the last position has zero gradient and contributes nothing
    assert out.logits.grad[:, -1].abs().max() == 0


def test_capture_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = TinyLM()
    proj = _proj()
    ids, labels = _batch()
    res = {}
    cap = LMHeadGradCapture(model.lm_head, proj, lambda g, c: res.__setitem__(c, g))
    for mode in ("fp32", "bf16"):
        model.zero_grad()
        cap.set_context(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "bf16")):
            logits = model(ids)
        F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1)).backward()
    assert res["bf16"].dtype == torch.float32
    rel = (res["bf16"] - res["fp32"]).norm() / res["fp32"].norm()
    assert rel < 0.05, rel


def test_attach_twice_no_double_count_and_remove():
    model = TinyLM()
    ids, labels = _batch()
    calls = []
    cap1 = LMHeadGradCapture(model.lm_head, _proj(), lambda g, c: calls.append(1))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cap2 = LMHeadGradCapture(model.lm_head, _proj(), lambda g, c: calls.append(2))
    assert any("replacing" in str(x.message) for x in w)
    assert not cap1.active and cap2.active
    assert LMHeadGradCapture.attached(model.lm_head) is cap2
    F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1)).backward()
    assert calls == [2]
    with torch.no_grad():
        model(ids)  # no graph: nothing registered
    cap2.remove()
    cap2.remove()
    assert LMHeadGradCapture.attached(model.lm_head) is None
    F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1)).backward()
    assert calls == [2]


def test_bad_inputs():
    model = TinyLM()
    with pytest.raises(TypeError):
        LMHeadGradCapture("not a module", _proj(), lambda g, c: None)
    with pytest.raises(TypeError):
        LMHeadGradCapture(model.lm_head, object(), lambda g, c: None)
    cap = LMHeadGradCapture(model.lm_head, _proj(v=V + 1), lambda g, c: None)
    ids, labels = _batch()
    with pytest.raises(ValueError, match="vocab size"):
        F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1)).backward()
    cap.remove()
    with pytest.raises(ValueError, match="could not find the LM head"):
        find_lm_head(nn.Sequential(nn.ReLU()))
    bare = nn.Linear(3, 3)
    assert find_lm_head(bare) == (bare, False)


def test_single_argument_callback():
    model = TinyLM()
    ids, labels = _batch()
    got = []
    cap = LMHeadGradCapture(model.lm_head, _proj(), got.append)
    F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1)).backward()
    assert len(got) == 1 and got[0].shape == (4, K1 * K2)
    cap.remove()


def test_tap_seq_first_functional_head():
    """A functional LM head (no module) in Megatron's [T, B, d] layout, fed through tap()."""
    torch.manual_seed(0)
    model = TinyLM()
    proj = _proj()
    ids, labels = _batch()
    got = []
    cap = LMHeadGradCapture(None, proj, lambda g, c: got.append(g), seq_first=True)
    h = model.hidden(ids).transpose(0, 1)                    # [T, B, d]
    logits = torch.nn.functional.linear(h, model.lm_head.weight)   # [T, B, V]
    cap.tap(h, logits)
    F.cross_entropy(logits.transpose(0, 1).reshape(-1, V), labels.reshape(-1), ignore_index=-100).backward()
    torch.testing.assert_close(got[0], _exact_per_sample(model, ids, labels, proj), rtol=1e-4, atol=1e-6)
    cap.remove()


@pytest.mark.parametrize("k", [0, 6])
def test_capture_matches_mixer_fused_path(tiny_store, k):
    """The generic capture and the Mixer's fused linear-CE path give the same per-domain sums, also with the
    projection's dense second stage (projection.k > 0), which both paths apply."""
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations import attach
    from megamix.mixer import Mixer
    from megamix.train.model import build_model

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={tiny_store.parent}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "projection.k1=8",
        "projection.k2=4", f"projection.k={k}"]).validate()
    store = TokenStore(tiny_store)
    sums = {}
    for mode in ("fused", "capture"):
        model = build_model(cfg.model, seed=0)
        mixer = Mixer(cfg, store)
        batch = mixer.next_step()[0]
        if mode == "fused":
            hidden = model.transformer(input_ids=batch.input_ids).last_hidden_state
            mixer.loss_and_stats(hidden, model.lm_head.weight, batch).backward()
        else:
            hook = attach(model, mixer, dp_world_size=1, auto_step=False)
            hook.set_batch(batch)
            logits = model(input_ids=batch.input_ids).logits
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1)).backward()
            hook.remove()
        sums[mode] = mixer.stats.sums.clone()
    assert sums["capture"].shape[1] == (k or 8 * 4) and sums["capture"].abs().max() > 0
    torch.testing.assert_close(sums["capture"], sums["fused"], rtol=1e-4, atol=1e-5 * float(sums["fused"].abs().max()))


class MegatronStyleLM(nn.Module):
    """A model laid out like megatron-core's GPTModel: the body runs [s, b, h] and ``output_layer`` maps
    it to [s, b, V] logits (a ColumnParallelLinear returns (logits, bias); here a Linear)."""

    def __init__(self, vocab, d):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.output_layer = nn.Linear(d, vocab, bias=False)

    def hidden(self, ids):                       # [b, s] -> [s, b, h]
        return self.body(self.emb(ids)).transpose(0, 1)

    def forward(self, ids):
        return self.output_layer(self.hidden(ids))   # [s, b, V]


def test_attach_recognises_megatron_seq_first_layout(tiny_store):
    """seq_len == micro-batch: only the layout says which axis is the sample. attach() must reduce over the
    sequence axis of Megatron's [s, b, h] output layer; reading it as [b, s, h] gives per-position rows."""
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations import attach
    from megamix.mixer import Mixer

    b = s = 8
    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={tiny_store.parent}", f"model.seq_len={s}", f"train.global_batch_size={b}",
        f"train.micro_batch_size={b}", "projection.k1=4", "projection.k2=3", "mixing.strategy=dograph"]).validate()
    store = TokenStore(tiny_store)
    torch.manual_seed(0)
    model = MegatronStyleLM(V, 16)         # token ids folded into a small vocabulary: exact fp32 references
    mixer = Mixer(cfg, store)
    hook = attach(model, mixer)
    assert hook.seq_first and hook.lm_head is model.output_layer
    batch = mixer.next_step()[0]
    ids, labels = batch.input_ids % V, batch.labels % V
    hook.set_batch(batch)
    logits = model(ids)                                                # [s, b, V]
    n_valid = labels.numel()
    F.cross_entropy(logits.transpose(0, 1).reshape(-1, V), labels.reshape(-1), reduction="sum").div(n_valid).backward()
    hook.remove()
    rows = mixer.stats.snapshot(1, mixer.domains).per_sample                # [b, k]
    with torch.no_grad():
        hid = model.hidden(ids).transpose(0, 1)                           # [b, s, h]

    def sample_loss(W, h, y):
        return F.cross_entropy(h @ W.t(), y, reduction="sum") / n_valid

    G = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(
        model.output_layer.weight.detach(), hid, labels)
    proj = mixer.head.projection
    exact = torch.einsum("kv,bvd,ld->bkl", proj.P1.double(), G.double(), proj.P2.double()).reshape(b, -1)
    assert_close(torch.as_tensor(rows), exact * mixer.head.grad_scale, "proj", torch.float32, "cpu", "per-sample rows")


def test_attach_refuses_a_vocab_parallel_output_layer(tiny_store):
    """A TP>1 Megatron output layer holds only a vocab shard: plain attach() would build P1 for the shard and
    never sum u over TP, so it refuses and names attach_megatron."""
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations import attach
    from megamix.mixer import Mixer

    model = MegatronStyleLM(V, 16)
    model.output_layer.output_size, model.output_layer.output_size_per_partition = 2 * V, V   # rank 0 of TP=2
    cfg = MegamixConfig.from_yaml(None, overrides=[f"data.data_dir={tiny_store.parent}", "model.seq_len=8",
                                                   "train.global_batch_size=4", "train.micro_batch_size=4"])
    with pytest.raises(ValueError, match="attach_megatron"):
        attach(model, Mixer(cfg.validate(), TokenStore(tiny_store)))


@pytest.mark.parametrize("seq_first", [True, False], ids=["megatron-[s,b,V]", "hf-[b,s,V]"])
def test_capture_projects_delta_in_its_own_layout_without_a_copy(seq_first):
    """The capture's u = δ P1ᵀ is formed in δ's own layout (Megatron's [s, b, V/tp] included): no transposed copy of
    the δ shard; only the small u and w are reordered. Same rows as projecting the batch-first δ."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from devicesim import peak_allocated

    S, B, Vb = 64, 4, 4096
    g = torch.Generator().manual_seed(0)
    proj = _proj(v=Vb)
    cap = LMHeadGradCapture(None, proj, lambda g_: None, seq_first=seq_first)
    delta_bf = torch.randn(B, S, Vb, generator=g)
    a_bf = torch.randn(B, S, D, generator=g)
    delta = delta_bf.transpose(0, 1).contiguous() if seq_first else delta_bf
    a = a_bf.transpose(0, 1).contiguous() if seq_first else a_bf
    proj.operand("P1", torch.float32, delta.device)
    proj.operand("P2", torch.float32, delta.device)
    peak, rows = peak_allocated(lambda: cap.compute(delta, a))
    assert peak < delta.numel() * delta.element_size() // 8, f"{peak} bytes: a copy of the {delta.numel() * 4}-byte δ"
    assert_close(rows, project_per_sample(delta_bf, a_bf, proj), "proj", torch.float32, "cpu", "capture rows")

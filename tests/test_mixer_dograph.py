"""DoGraph's in-step reweighting through the Mixer: the weighted gradient reaches the whole network.

For the fused path (torch and Triton-interpreter backends; chunks cut at sample boundaries, and the
two-pass recompute when a sample is longer than a chunk) and the capture path, after one round has
given the strategy its clusters: every parameter's gradient equals autograd on the explicitly weighted
loss ``Σ_i w_i ℓ_i`` (``ℓ_i`` = sample i's share of the mean cross-entropy) with the weights the Mixer
used; the weights have mean 1 over the micro-batch and are not all 1; the reported loss is the plain
mean cross-entropy; before the first refresh the gradient is the plain one, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamix.kernels.testing import assert_close

V, D = 256, 16          # token ids are folded into a small vocabulary: fast under the Triton interpreter


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.body = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.lm_head = nn.Linear(D, V, bias=False)

    def hidden(self, ids):
        return self.body(self.emb(ids))

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))


def _mixer(tiny_store, *extra):
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={tiny_store.parent}", "model.seq_len=12", "train.global_batch_size=8",
        "train.micro_batch_size=8", "projection.k1=8", "projection.k2=4", "mixing.strategy=dograph",
        "mixing.update_every=1", "mixing.min_weight=0", *extra]).validate()
    return Mixer(cfg, TokenStore(tiny_store))


def _fold(batch):
    labels = batch.labels % V
    labels[0, :4] = -100                      # ignored tokens, and one sample with no token at all
    labels[3, :] = -100
    return batch.input_ids % V, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _fused_step(model, mixer, batch):
    ids, labels = _fold(batch)
    model.zero_grad(set_to_none=True)
    loss = mixer.lm_head_loss(model.hidden(ids), model.lm_head.weight, labels, batch.domain_ids, batch.sample_ids)
    loss.backward()
    return loss.detach(), _grads(model)


def _capture_step(model, hook, batch):
    ids, labels = _fold(batch)
    model.zero_grad(set_to_none=True)
    hook.set_batch(batch)
    tok = F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1), reduction="none").reshape(labels.shape)
    hook.record_loss(tok, labels)
    loss = tok.sum() / (labels != -100).sum()
    loss.backward()
    return loss.detach(), _grads(model)


def _reference(model, batch, w):
    """Autograd on Σ_i w_i ℓ_i, ℓ_i = Σ_{t∈i} CE_t / (valid tokens of the micro-batch); no capture runs."""
    from megamix.integrations.hook import LMHeadGradCapture

    ids, labels = _fold(batch)
    model.zero_grad(set_to_none=True)
    cap = LMHeadGradCapture.attached(model.lm_head)
    if cap is not None:
        cap.enabled = False
    try:
        tok = F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1), reduction="none").reshape(labels.shape)
    finally:
        if cap is not None:
            cap.enabled = True
    per_sample = tok.sum(1) / (labels != -100).sum()
    (per_sample * w).sum().backward()
    return per_sample.sum().detach(), _grads(model)


def _first_round(model, mixer, step_fn):
    """Round 1: plain training (no clusters yet; the gradient is the plain one), then the refresh."""
    batch = mixer.next_step()[0]
    loss, got = step_fn(batch)
    assert not mixer.head.reweighting and mixer.head.last_sample_weights is None
    _, plain = _reference(model, batch, torch.ones(len(batch)))
    for n in plain:
        assert_close(got[n], plain[n], "grad", torch.float32, "cpu", f"round 1 {n}")
    assert mixer.step(0) is not None and mixer.head.reweighting
    st = mixer.strategy
    assert st.centroids.shape[0] >= 2 and abs(st.cluster_weights.sum() - 1) < 1e-12


def _check_weighted(model, mixer, step_fn):
    batch = mixer.next_step()[0]
    loss, got = step_fn(batch)
    w = mixer.head.last_sample_weights
    _, labels = _fold(batch)
    valid = (labels != -100).any(1)
    assert w.shape == (len(batch),) and w[~valid].abs().max() == 0
    assert abs(float(w[valid].mean()) - 1.0) < 1e-6, "weights must have mean 1 over the samples"
    assert float(w[valid].std()) > 0.05, f"the clusters gave (nearly) equal weights {w.tolist()}"
    plain_loss, ref = _reference(model, batch, w)
    assert abs(float(loss) - float(plain_loss)) < 1e-5, "the reported loss is the plain mean CE"
    for n in ref:
        assert_close(got[n], ref[n], "grad", torch.float32, "cpu", f"weighted {n}")
    _, unweighted = _reference(model, batch, torch.ones(len(batch)))
    assert (got["emb.weight"] - unweighted["emb.weight"]).abs().max() > 1e-4, "the weights changed nothing"
    return w


@pytest.mark.parametrize("backend,chunk,u_method", [
    ("torch", 4096, "fused"), ("torch", 25, "fused"), ("torch", 5, "fused"), ("triton", 40, "fused"),
    ("triton", 7, "fused"), ("torch", 25, "augmented"), ("torch", 5, "gemm"), ("triton", 40, "tiled")])
def test_fused_weighted_gradient_reaches_the_whole_network(tiny_store, backend, chunk, u_method):
    """chunk 4096: one chunk; 25: chunks of 2 samples (cut at 24 tokens); 5 < seq_len 12: the two-pass
    recompute. Triton: the interpreted CE kernel in both regimes. The other projection.u_method values run
    through the mixer too (their u feeds the cluster weights before dX/dW)."""
    mixer = _mixer(tiny_store, f"projection.backend={backend}", f"projection.chunk_tokens={chunk}",
                   f"projection.u_method={u_method}")
    torch.manual_seed(0)
    model = TinyLM()
    _first_round(model, mixer, lambda b: _fused_step(model, mixer, b))
    _check_weighted(model, mixer, lambda b: _fused_step(model, mixer, b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_capture_weighted_gradient_reaches_the_whole_network(tiny_store, backend):
    """The capture's tensor hook returns δ scaled per sample (Triton: the interpreted per-sample reduction)."""
    from megamix.integrations import attach

    mixer = _mixer(tiny_store, f"projection.backend={backend}")
    torch.manual_seed(0)
    model = TinyLM()
    hook = attach(model, mixer, auto_step=False)
    _first_round(model, mixer, lambda b: _capture_step(model, hook, b))
    _check_weighted(model, mixer, lambda b: _capture_step(model, hook, b))
    hook.remove()


def test_fused_and_capture_give_the_same_weights_and_rows(tiny_store):
    """Both paths record the same unweighted rows and apply the same weights to the same model."""
    from megamix.integrations import attach

    torch.manual_seed(0)
    model = TinyLM()
    fused, capt = _mixer(tiny_store), _mixer(tiny_store)
    for m in (fused, capt):
        batch = m.next_step()[0]
        _fused_step(model, m, batch)
        m.step(0)
    hook = attach(model, capt, auto_step=False)
    bf, bc = fused.next_step()[0], capt.next_step()[0]
    assert torch.equal(bf.input_ids, bc.input_ids)
    _, gf = _fused_step(model, fused, bf)
    _, gc = _capture_step(model, hook, bc)
    hook.remove()
    torch.testing.assert_close(fused.head.last_sample_weights, capt.head.last_sample_weights, rtol=1e-5, atol=1e-6)
    for n in gf:
        assert_close(gf[n], gc[n], "grad", torch.float32, "cpu", n)
    rf, rc = (m.stats.snapshot(2, m.domains) for m in (fused, capt))
    assert_close(torch.as_tensor(rf.per_sample), torch.as_tensor(rc.per_sample), "proj", torch.float32, "cpu",
                 "rows")
    assert rf.extra["per_sample_keys"].tolist() == rc.extra["per_sample_keys"].tolist()


def test_cross_domain_clusters_change_the_update(tiny_store):
    """π = [0.09, 0.91] on two clusters that each hold samples of every domain: the sampling variant maps
    it to the domains' own shares (no effect at all), the gradient reweighting gives the update
    0.09·ḡ_0 + 0.91·ḡ_1 of the micro-batch when its cluster shares are q."""
    from megamix.strategies.dograph import clusters_to_domains

    mixer = _mixer(tiny_store, "projection.backend=torch")
    torch.manual_seed(0)
    model = TinyLM()
    batch = mixer.next_step()[0]
    _fused_step(model, mixer, batch)
    rows = torch.as_tensor(mixer.stats.snapshot(1, mixer.domains).per_sample)
    valid = (rows != 0).any(1)
    # two centroids = the unit directions of two valid rows; every row goes to the nearer one
    idx = torch.nonzero(valid).squeeze(1)
    cen = rows[idx[[0, 1]]] / rows[idx[[0, 1]]].norm(dim=1, keepdim=True)
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lab = (unit @ cen.t()).argmax(1)
    nc = torch.stack([((lab == c) & valid).sum() for c in (0, 1)]).double()
    q = (nc / nc.sum()).numpy()
    mixer.strategy.set_clusters(cen.numpy(), [0.09, 0.91], q)
    _, got = _fused_step(model, mixer, batch)      # the same micro-batch again, now weighted
    w = mixer.head.last_sample_weights
    expect = torch.where(lab == 0, 0.09 / float(q[0]), 0.91 / float(q[1])) * valid
    torch.testing.assert_close(w, expect.float(), rtol=1e-6, atol=1e-7)
    # the weighted micro-batch update is Σ_c π_c ḡ_c in the space of the recorded rows
    ghat = [rows[(lab == c) & valid].double().mean(0) for c in (0, 1)]
    upd = (w.double()[:, None] * rows.double()).sum(0) / valid.sum()
    torch.testing.assert_close(upd, 0.09 * ghat[0] + 0.91 * ghat[1], rtol=1e-5, atol=1e-9)
    _, plain = _reference(model, batch, torch.ones(len(batch)))
    assert (got["lm_head.weight"] - plain["lm_head.weight"]).abs().max() > 1e-4
    # the sampling variant on an even contingency table: π has no effect
    lab2 = torch.tensor([0, 0, 1, 1]).numpy()
    dom2 = torch.tensor([0, 1, 0, 1]).numpy()
    w_dom, _ = clusters_to_domains([0.09, 0.91], lab2, dom2, 2)
    assert w_dom.tolist() == [0.5, 0.5]


def test_vocab_parallel_fused_loss_refuses_gradient_reweighting(tiny_store):
    from megamix.integrations.megatron import vocab_parallel_lm_head_loss

    mixer = _mixer(tiny_store)
    batch = mixer.next_step()[0]
    ids, labels = _fold(batch)
    h = torch.randn(len(batch), ids.shape[1], D, requires_grad=True)
    with pytest.raises(ValueError, match="dograph-sample"):
        vocab_parallel_lm_head_loss(mixer, h, torch.randn(V, D), labels, batch.domain_ids, seq_first=False,
                                    vocab_start=0, vocab_end=V)

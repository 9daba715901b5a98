"""GPU contracts of the Mixer, seen on a CPU (tests/devicesim.py): a fused or captured micro-step makes no host
sync and no device-to-host copy, with R&B and with DoGraph reweighting; a mixing round makes one device-to-host
copy (the statistics snapshot); the statistics live on the device the gradients are computed on, also after a
resume.

Before the GPU-contract work, one ``Mixer.loss_and_stats`` forward + backward made 14 host syncs with R&B and 17
with DoGraph (scalar reads of valid-token counts and segment bounds, ``nonzero``, ``torch.equal`` in backward, and
``.cpu()`` copies of every statistic).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from devicesim import DeviceSim

V, D = 256, 16


def _mixer(tiny_store, strategy, *extra):
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={tiny_store.parent}", "model.seq_len=12", "train.global_batch_size=8",
        "train.micro_batch_size=4", "projection.k1=8", "projection.k2=4", f"mixing.strategy={strategy}",
        "mixing.update_every=2", "mixing.min_weight=0", *extra]).validate()
    return Mixer(cfg, TokenStore(tiny_store))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.emb(ids))

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))


def _train(mixer, model, sim, steps, micro):
    """``steps`` optimizer steps; each micro-step runs in region ``micro`` (the callable does the forward +
    backward), each ``Mixer.step`` in region ``round``."""
    reweighted = 0
    for step in range(steps):
        for batch in mixer.next_step():
            with sim.region("micro"):
                micro(batch)
            reweighted += int(mixer.head.reweighting)
        with sim.region("round"):
            mixer.step(step)
    return reweighted


@pytest.mark.parametrize("strategy", ["rnb", "dograph"])
def test_a_fused_micro_step_makes_no_host_sync(tiny_store, strategy):
    mixer = _mixer(tiny_store, strategy)
    model = TinyLM()
    sim = DeviceSim().mark(model)

    def micro(batch):
        loss = mixer.loss_and_stats(model.hidden(batch.input_ids % V), model.lm_head.weight, _folded(batch))
        (loss / 2).backward()

    with sim:
        reweighted = _train(mixer, model, sim, steps=6, micro=micro)
    assert sim.count("sync", "micro") == 0, sim.explain("sync", "micro")
    assert sim.count("d2h", "micro") == 0
    rounds = 3
    assert sim.count("d2h", "round") == rounds, sim.explain("d2h", "round")     # one snapshot per round
    assert sim.count("sync", "round") == rounds, sim.explain("sync", "round")
    if strategy == "dograph":   # the reweighting path ran in the measured micro-steps, not only the plain one
        assert reweighted >= 4


def _folded(batch):
    """The batch with its token ids folded into the tiny vocabulary (a view the fused loss can take)."""
    class B:
        pass
    b = B()
    b.labels, b.domain_ids, b.sample_ids = batch.labels % V, batch.domain_ids, batch.sample_ids
    b.labels[batch.labels < 0] = -100
    return b


@pytest.mark.parametrize("strategy", ["rnb", "dograph"])
def test_a_captured_micro_step_makes_no_host_sync(tiny_store, strategy):
    from megamix.integrations.hook import attach

    mixer = _mixer(tiny_store, strategy)
    model = TinyLM()
    hook = attach(model, mixer, auto_step=False)
    sim = DeviceSim().mark(model)

    def micro(batch):
        b = _folded(batch)
        hook.set_batch(batch)
        logits = model(batch.input_ids % V)
        tok = F.cross_entropy(logits.reshape(-1, V), b.labels.reshape(-1), reduction="none").reshape(b.labels.shape)
        hook.record_loss(tok, b.labels)
        (tok.sum() / (b.labels != -100).sum()).backward()

    with sim:
        reweighted = _train(mixer, model, sim, steps=6, micro=micro)
    hook.remove()
    assert sim.count("sync", "micro") == 0, sim.explain("sync", "micro")
    assert sim.count("d2h", "round") == 3, sim.explain("d2h", "round")
    if strategy == "dograph":
        assert reweighted >= 4


def test_the_statistics_stay_on_the_device_also_after_a_resume():
    """Accumulators live where the rows are computed (here the meta device stands for a GPU); a state restored on
    the CPU moves there at the next update, instead of keeping the round on the CPU (which NCCL refuses)."""
    from megamix.stats import DomainStats

    s = DomainStats(3, 4, keep_per_sample=True, max_rows=4)
    s.update(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), sample_ids=torch.arange(5),
             token_loss_sum=torch.ones(5), token_count=torch.ones(5))
    restored = DomainStats(3, 4, keep_per_sample=True, max_rows=4)
    restored.load_state_dict(s.state_dict())
    meta = torch.device("meta")
    restored.update(torch.empty(2, 4, device=meta), torch.tensor([0, 1]), sample_ids=torch.arange(5, 7),
                    token_loss_sum=torch.ones(2, device=meta), token_count=torch.ones(2, device=meta))
    held = [restored.sums, restored.counts, restored.loss_sum, restored.token_count,
            *restored._rows, *restored._row_keys, *restored._row_domains, *restored._row_loss]
    assert {t.device for t in held} == {meta}
    fresh = DomainStats(3, 4, keep_per_sample=False)
    fresh.update(torch.empty(2, 4, device=meta), torch.tensor([0, 2]))
    assert fresh.sums.device == meta and fresh.counts.device == meta


def test_a_round_copies_the_statistics_to_the_host_once_and_exactly():
    """The snapshot packs every accumulator and per-sample row (float64 parts as int64 bit patterns next to the
    int64 keys) into one copy; keys whose bit pattern is a float64 NaN arrive unchanged."""
    import numpy as np

    from megamix.stats import DomainStats

    s = DomainStats(2, 3, keep_per_sample=True)
    keys = torch.tensor([0x7FF8_0000_0000_0001, 0x7FF0_0000_0000_0000, 5], dtype=torch.int64)  # NaN / inf patterns
    g = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 1e-30], [7.0, 8.0, 9.0]])
    s.update(g, torch.tensor([0, 1, 1]), sample_ids=torch.tensor([10, 11, 12]), keys=keys,
             token_loss_sum=torch.tensor([3.0, 4.0, 5.0]), token_count=torch.tensor([1.0, 2.0, 0.0]))
    sim = DeviceSim().mark(s.sums, s.counts, s.loss_sum, s.token_count, *s._rows, *s._row_keys, *s._row_ids,
                           *s._row_domains, *s._row_loss)
    with sim:
        snap = s.snapshot(1, ["a", "b"])
    assert sim.count("d2h") == 1, sim.explain("d2h")
    assert np.array_equal(snap.extra["per_sample_keys"], keys.numpy())
    assert np.array_equal(snap.per_sample, g.numpy()) and snap.per_sample_domain.tolist() == [0, 1, 1]
    assert snap.counts.tolist() == [1, 2] and np.allclose(snap.sums, [[1, 2, 3], [7.5, 7, 9]])
    assert snap.extra["per_sample_ids"].tolist() == [10, 11, 12]
    assert np.allclose(snap.domain_loss, [3.0, 4.5])

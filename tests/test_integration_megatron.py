"""Vocab-parallel (Megatron tensor-parallel) LM heads on 2 simulated TP ranks (gloo, torch.multiprocessing).

One spawn (module fixture ``tp_runs``) runs every multi-rank scenario and saves each rank's results; the
tests compare them with the unsharded computation done here in the parent process:
- the fused vocab-parallel kernel path (torch and Triton-interpreter backends; ignore_index tokens; a padded
  vocabulary whose padded rows are zero; chunk_tokens < N; ``reduce_dx=False``);
- the capture path (:func:`vocab_parallel_capture` under a vocab-parallel loss, with a second-stage
  projection ``k > 0``), and :func:`attach_megatron` on a Megatron-shaped model;
- the fused Megatron glue :func:`vocab_parallel_lm_head_loss` through a real Mixer: statistics identical on
  both ranks and equal to the non-TP ``Mixer.lm_head_loss``.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamix.kernels.domain_gram import per_sample_grads
from megamix.kernels.fused_linear_ce import (ce_delta_torch, ce_delta_triton, ce_shard_delta_torch, ce_shard_delta_triton,
                                     ce_shard_stats_torch, ce_shard_stats_triton, fused_linear_cross_entropy,
                                     vocab_parallel_cross_entropy_ref, vocab_parallel_fused_linear_cross_entropy)
from megamix.kernels.projection import make_projection
from megamix.kernels.testing import assert_close
from megamix.integrations.hook import LMHeadGradCapture
from megamix.integrations.megatron import (attach_megatron, vocab_parallel_capture, vocab_parallel_lm_head_loss,
                                           vocab_range)
from ranks import free_port as _free_port, spawn

TP = 2
D, B, T, K1, K2 = 12, 3, 8, 5, 3
N = B * T
# (name, real vocabulary, padded vocabulary (a multiple of TP), chunk_tokens): "padded" pads 45 -> 48 with
# zero rows that no label points at and chunks 24 tokens by 10; "even" has no padding and one chunk.
KERNEL_CASES = (("padded", 45, 48, 10), ("even", 64, 64, 64))
BACKENDS = ("torch", "triton")
#: (backend, u_method) of the other places u can be computed, run on the padded case (the shard's P1ᵀ rows, W_aug's
#: zero padding rows and the final all-reduce of u must all agree with the unsharded call)
U_METHOD_CASES = (("torch", "gemm"), ("torch", "augmented"), ("triton", "augmented"), ("triton", "tiled"))
GRAD_OUT = 0.75                                  # backward through loss * GRAD_OUT: the grad_output scaling path
GLUE_S = GLUE_B = 8                              # the glue's micro-batch: seq_len == micro-batch, as in Megatron tests
GLUE_V, GLUE_V_PAD, GLUE_D = 37, 40, 16



def _kernel_data(v_real: int, v_pad: int):
    """Full padded head (padded rows zero), hidden [N, D], labels in [0, v_real) with ignored tokens."""
    g = torch.Generator().manual_seed(v_pad)
    W = torch.randn(v_pad, D, generator=g) * 0.5
    W[v_real:] = 0.0
    hidden = torch.randn(N, D, generator=g)
    labels = torch.randint(0, v_real, (N,), generator=g)
    labels[[1, 2, 11, 20]] = -100
    return W, hidden, labels, make_projection(v_pad, D, K1, K2, seed=v_pad)


def _fused(fn, W, hidden, labels, proj, chunk, backend, **kw):
    """Run a fused LCE function with a backward; return every quantity the tests compare."""
    W = W.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    out = fn(h, W, labels, projection=proj, chunk_tokens=chunk, backend=backend, **kw)
    (out.loss * GRAD_OUT).backward()
    g = per_sample_grads(out.u, out.w, torch.arange(B).repeat_interleave(T), B, backend="torch")
    return {"loss": out.loss.detach(), "token_loss": out.token_loss, "u": out.u, "w": out.w, "dX": h.grad,
            "dW": W.grad, "g": g}


# ------------------------------------------------------------------------------------ Megatron-shaped model
class ShardHead(nn.Linear):
    """Stands in for Megatron's ColumnParallelLinear output layer: a vocab shard that knows the full
    (padded) vocabulary, returns ``(logits, bias)``, and has no sequence parallelism."""

    def __init__(self, d: int, vocab: int, rows: int):
        super().__init__(d, rows, bias=False)
        self.input_size, self.output_size = d, vocab
        self.tp_group, self.sequence_parallel = None, False

    def forward(self, x):
        return super().forward(x), None


class HeadOnlyGPT(nn.Module):
    """A GPTModel reduced to its output layer: fed [s, b, h], returns the logits shard [s, b, V/tp]."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.output_layer = head

    def forward(self, hidden):
        return self.output_layer(hidden)[0]


def _glue_cfg(store_dir: str):
    from megamix.config import MegamixConfig
    return MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={os.path.dirname(store_dir)}", f"model.seq_len={GLUE_S}",
        f"train.global_batch_size={GLUE_B}", f"train.micro_batch_size={GLUE_B}", "projection.k1=4",
        "projection.k2=3", "projection.k=5", "projection.backend=torch", "mixing.strategy=dograph-sample"]).validate()


def _glue_mixer(store_dir: str):
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    return Mixer(_glue_cfg(store_dir), TokenStore(store_dir))


def _glue_data(batch):
    """Hidden [s, b, h], the full padded head and labels folded into the small vocabulary (some ignored)."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(GLUE_S, GLUE_B, GLUE_D, generator=g)
    W = torch.randn(GLUE_V_PAD, GLUE_D, generator=g) * 0.5
    W[GLUE_V:] = 0.0
    labels = batch.labels % GLUE_V
    labels[0, :3] = -100
    labels[5, -2:] = -100
    return hidden, W, labels


def _stats(mixer) -> dict:
    snap = mixer.stats.snapshot(1, mixer.domains)
    return {k: torch.as_tensor(v) for k, v in (("sums", snap.sums), ("counts", snap.counts),
                                               ("per_sample", snap.per_sample), ("domain_loss", snap.domain_loss))}


# ------------------------------------------------------------------------------------ the TP ranks
def _kernel_runs(rank: int) -> dict:
    res = {}
    for name, v_real, v_pad, chunk in KERNEL_CASES:
        W, hidden, labels, proj = _kernel_data(v_real, v_pad)
        s, e = vocab_range(v_pad, rank, TP)
        for be in BACKENDS:
            res[(name, be)] = _fused(vocab_parallel_fused_linear_cross_entropy, W[s:e], hidden, labels, proj, chunk,
                                     be, vocab_start=s)
    W, hidden, labels, proj = _kernel_data(45, 48)
    s, e = vocab_range(48, rank, TP)
    for be, um in U_METHOD_CASES:
        res[("u_method", be, um)] = _fused(vocab_parallel_fused_linear_cross_entropy, W[s:e], hidden, labels, proj, 10,
                                           be, vocab_start=s, u_method=um)
    rank_part = _fused(vocab_parallel_fused_linear_cross_entropy, W[s:e], hidden, labels, proj, 10, "torch",
                     vocab_start=s, reduce_dx=False)
    res["partial_dX"] = rank_part["dX"]
    summed = rank_part["dX"].clone()
    dist.all_reduce(summed)
    res["summed_dX"] = summed
    return res


def _capture_run(rank: int) -> dict:
    """vocab_parallel_capture on a shard under the reference vocab-parallel loss, projection with k > 0."""
    W, hidden, labels, _ = _kernel_data(45, 48)
    proj = make_projection(48, D, K1, K2, seed=5, k=4)
    s, e = vocab_range(48, rank, TP)
    shard = nn.Linear(D, e - s, bias=False)
    shard.weight.data.copy_(W[s:e])
    got = []
    vocab_parallel_capture(shard, proj, lambda g, c: got.append((g, c)), vocab_start=s, vocab_end=e, seq_first=False)
    LMHeadGradCapture.attached(shard).set_context(("tp", rank))
    a = hidden.reshape(B, T, D).clone().requires_grad_(True)
    tok = vocab_parallel_cross_entropy_ref(shard(a), labels.reshape(B, T), vocab_start=s)
    (tok.sum() / (labels != -100).sum()).backward()
    a_grad = a.grad.clone()
    dist.all_reduce(a_grad)   # Megatron's copy-to-TP-region backward does this all-reduce
    return {"tok": tok.detach(), "wgrad": shard.weight.grad, "agrad": a_grad, "g": got[0][0], "ctx": got[0][1]}


def _glue_runs(rank: int, store_dir: str) -> dict:
    """The fused glue (seq-first and batch-first) and attach_megatron's capture, each into its own Mixer."""
    tp_group = dist.group.WORLD
    out = {}
    for seq_first in (True, False):
        mixer = _glue_mixer(store_dir)
        batch = mixer.next_step()[0]
        hidden, W, labels = _glue_data(batch)
        s, e = vocab_range(GLUE_V_PAD, rank, TP)
        h = (hidden if seq_first else hidden.transpose(0, 1).contiguous()).requires_grad_(True)
        Ws = W[s:e].clone().requires_grad_(True)
        loss = vocab_parallel_lm_head_loss(mixer, h, Ws, labels, batch.domain_ids, batch.sample_ids, vocab_start=s,
                                           vocab_end=e, tp_group=tp_group, seq_first=seq_first)
        loss.backward()
        out[("glue", seq_first)] = {"loss": loss.detach(), "dX": h.grad, "dW": Ws.grad, "stats": _stats(mixer)}
    mixer = _glue_mixer(store_dir)
    batch = mixer.next_step()[0]
    hidden, W, labels = _glue_data(batch)
    s, e = vocab_range(GLUE_V_PAD, rank, TP)
    head = ShardHead(GLUE_D, GLUE_V_PAD, e - s)
    head.weight.data.copy_(W[s:e])
    model = HeadOnlyGPT(head)
    hook = attach_megatron(model, mixer, tp_group=tp_group)
    assert attach_megatron(model, mixer, tp_group=tp_group) is hook          # idempotent
    hook.set_batch(batch)
    tok = vocab_parallel_cross_entropy_ref(model(hidden), labels.t(), vocab_start=s)       # [s, b]
    hook.record_loss(tok.t(), labels)                                  # optional: per-domain train losses
    (tok.sum() / (labels != -100).sum()).backward()
    hook.remove()
    out["attach_megatron"] = {"stats": _stats(mixer), "seq_first": hook.seq_first}
    return out


def _tp_worker(rank: int, world: int, port: int, out_dir: str, store_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {"kernel": _kernel_runs(rank), "capture": _capture_run(rank), "glue": _glue_runs(rank, store_dir)}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_runs(tiny_store, tmp_path_factory):
    """Results of both TP ranks: ``[rank0, rank1]``."""
    out = tmp_path_factory.mktemp("tp_runs")
    spawn(_tp_worker, (TP, _free_port(), str(out), str(tiny_store)), TP)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(TP)]


def _compare(got: dict, ref: dict, keys_quantities, what: str, dw_rows: tuple[int, int] | None = None) -> None:
    for key, quantity in keys_quantities:
        expected = ref[key][dw_rows[0]:dw_rows[1]] if (key == "dW" and dw_rows) else ref[key]
        assert_close(got[key], expected, quantity, torch.float32, "cpu", f"{what}: {key}")


# ------------------------------------------------------------------------------------ multi-rank tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_vocab_parallel_fused_equals_unsharded(tp_runs, case, backend):
    name, v_real, v_pad, chunk = case
    W, hidden, labels, proj = _kernel_data(v_real, v_pad)
    ref = _fused(fused_linear_cross_entropy, W, hidden, labels, proj, chunk, backend)
    keys = [("loss", "loss"), ("token_loss", "loss"), ("dX", "grad"), ("dW", "grad"), ("u", "proj"), ("w", "proj"),
            ("g", "proj")]
    for rank, res in enumerate(tp_runs):
        _compare(res["kernel"][(name, backend)], ref, keys, f"{name}/{backend}/rank{rank}",
                 dw_rows=vocab_range(v_pad, rank, TP))
    if v_pad != v_real:  # padded rows take part in the softmax, so their gradient is not zero, only unused by labels
        assert tp_runs[-1]["kernel"][(name, backend)]["dW"][v_real - v_pad:].abs().sum() > 0


@pytest.mark.parametrize("backend,u_method", U_METHOD_CASES)
def test_vocab_parallel_u_methods_equal_unsharded(tp_runs, backend, u_method):
    W, hidden, labels, proj = _kernel_data(45, 48)
    ref = _fused(fused_linear_cross_entropy, W, hidden, labels, proj, 10, backend)
    keys = [("loss", "loss"), ("token_loss", "loss"), ("dX", "grad"), ("dW", "grad"), ("u", "proj"), ("g", "proj")]
    for rank, res in enumerate(tp_runs):
        _compare(res["kernel"][("u_method", backend, u_method)], ref, keys, f"{u_method}/{backend}/rank{rank}",
                 dw_rows=vocab_range(48, rank, TP))


def test_reduce_dx_false_returns_the_rank_partial(tp_runs):
    """reduce_dx=False: each rank's dX is its own δ_r W_r; their sum is the unsharded dX."""
    W, hidden, labels, proj = _kernel_data(45, 48)
    ref = _fused(fused_linear_cross_entropy, W, hidden, labels, proj, 10, "torch")
    valid = labels != -100
    delta = torch.softmax(hidden @ W.t(), dim=1)
    delta[valid.nonzero().squeeze(1), labels[valid]] -= 1.0
    delta *= (valid / valid.sum() * GRAD_OUT)[:, None]
    for rank, res in enumerate(tp_runs):
        s, e = vocab_range(48, rank, TP)
        assert_close(res["kernel"]["partial_dX"], delta[:, s:e] @ W[s:e], "grad", torch.float32, "cpu",
                     f"rank{rank} partial dX")
        assert_close(res["kernel"]["summed_dX"], ref["dX"], "grad", torch.float32, "cpu", f"rank{rank} Σ partial dX")


def test_vocab_parallel_capture_equals_unsharded(tp_runs):
    W, hidden, labels, _ = _kernel_data(45, 48)
    proj = make_projection(48, D, K1, K2, seed=5, k=4)
    head = nn.Linear(D, 48, bias=False)
    head.weight.data.copy_(W)
    got = []
    cap = LMHeadGradCapture(head, proj, lambda g, c: got.append(g))
    a = hidden.reshape(B, T, D).clone().requires_grad_(True)
    tok = F.cross_entropy(head(a).reshape(N, -1), labels, reduction="none").reshape(B, T)
    (tok.sum() / (labels != -100).sum()).backward()
    cap.remove()
    assert got[0].shape == (B, 4)
    for rank, res in enumerate(tp_runs):
        s, e = vocab_range(48, rank, TP)
        c = res["capture"]
        assert c["ctx"] == ("tp", rank)
        assert_close(c["tok"], tok.detach(), "loss", torch.float32, "cpu", f"rank{rank} token loss")
        assert_close(c["wgrad"], head.weight.grad[s:e], "grad", torch.float32, "cpu", f"rank{rank} dW shard")
        assert_close(c["agrad"], a.grad, "grad", torch.float32, "cpu", f"rank{rank} d hidden")
        assert_close(c["g"], got[0], "proj", torch.float32, "cpu", f"rank{rank} g")


def _non_tp_glue_reference(store_dir: str):
    """The non-TP fused path: Mixer.lm_head_loss on [b, s, h] with the full padded head."""
    mixer = _glue_mixer(store_dir)
    batch = mixer.next_step()[0]
    hidden, W, labels = _glue_data(batch)
    h = hidden.transpose(0, 1).contiguous().requires_grad_(True)
    W = W.requires_grad_(True)
    loss = mixer.lm_head_loss(h, W, labels, batch.domain_ids, batch.sample_ids)
    loss.backward()
    return {"loss": loss.detach(), "dX": h.grad.transpose(0, 1), "dW": W.grad, "stats": _stats(mixer)}


def _assert_same_stats(got: dict, ref: dict, what: str) -> None:
    assert torch.equal(got["counts"], ref["counts"]), what
    for key in ("sums", "per_sample", "domain_loss"):
        quantity = "loss" if key == "domain_loss" else "proj"
        assert_close(got[key], ref[key], quantity, torch.float32, "cpu", f"{what}: {key}")


def test_megatron_glue_statistics_equal_non_tp_mixer(tp_runs, tiny_store):
    ref = _non_tp_glue_reference(str(tiny_store))
    assert ref["stats"]["per_sample"].shape == (GLUE_B, 5)              # projection.k = 5: finalize applied
    for seq_first in (True, False):
        for rank, res in enumerate(tp_runs):
            got = res["glue"][("glue", seq_first)]
            what = f"glue seq_first={seq_first} rank{rank}"
            assert_close(got["loss"], ref["loss"], "loss", torch.float32, "cpu", what)
            dX = got["dX"] if seq_first else got["dX"].transpose(0, 1)
            assert_close(dX, ref["dX"], "grad", torch.float32, "cpu", f"{what}: d hidden")
            s, e = vocab_range(GLUE_V_PAD, rank, TP)
            assert_close(got["dW"], ref["dW"][s:e], "grad", torch.float32, "cpu", f"{what}: dW shard")
            _assert_same_stats(got["stats"], ref["stats"], what)
        for key, value in tp_runs[0]["glue"][("glue", seq_first)]["stats"].items():   # TP ranks: identical copies
            assert torch.equal(value, tp_runs[1]["glue"][("glue", seq_first)]["stats"][key]), key


def test_attach_megatron_capture_statistics_equal_non_tp_mixer(tp_runs, tiny_store):
    ref = _non_tp_glue_reference(str(tiny_store))
    for rank, res in enumerate(tp_runs):
        got = res["glue"]["attach_megatron"]
        assert got["seq_first"]
        _assert_same_stats(got["stats"], ref["stats"], f"attach_megatron rank{rank}")


# ------------------------------------------------------------------------------------ single-process tests
@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_passes_combine_to_the_single_device_pass(backend):
    """Pass A on two shards, combined by hand like the all-reduces, then pass B, equals the one-pass kernel."""
    stats, delta = ((ce_shard_stats_triton, ce_shard_delta_triton) if backend == "triton"
                    else (ce_shard_stats_torch, ce_shard_delta_torch))
    one_pass = ce_delta_triton if backend == "triton" else ce_delta_torch
    W, hidden, labels, proj = _kernel_data(45, 48)
    logits = hidden @ W.t()
    p1t, p1_scale = proj.operand("P1", torch.float32, "cpu")
    full = logits.clone()
    tok_ref, u_ref = one_pass(full, labels, 0.1, -100, p1t, p1_scale)
    parts = [stats(logits[:, s:e].contiguous(), labels, s, -100) for s, e in (vocab_range(48, r, 2) for r in range(2))]
    m = torch.maximum(parts[0][0], parts[1][0])
    lse = m + torch.log(sum(se * torch.exp(mr - m) for mr, se, _ in parts))
    zy = parts[0][2] + parts[1][2]
    valid = labels != -100
    assert_close(torch.where(valid, lse - zy, torch.zeros_like(lse)), tok_ref, "loss", torch.float32, "cpu", "loss")
    u = torch.zeros_like(u_ref)
    for r in range(2):
        s, e = vocab_range(48, r, 2)
        shard = logits[:, s:e].contiguous()
        u += delta(shard, labels, lse, 0.1, s, -100, p1t[s:e], p1_scale)
        assert_close(shard, full[:, s:e], "grad", torch.float32, "cpu", f"δ shard {r}")
    assert_close(u, u_ref, "proj", torch.float32, "cpu", "u")
    assert delta(logits[:, :24].contiguous(), labels, lse, 0.1, 0, -100) is None   # no projection -> no u


def test_one_rank_is_the_single_device_function():
    """No process group: the vocab-parallel function is fused_linear_cross_entropy itself (bit-identical)."""
    W, hidden, labels, proj = _kernel_data(45, 48)
    got = _fused(vocab_parallel_fused_linear_cross_entropy, W, hidden, labels, proj, 10, "torch", vocab_start=0)
    ref = _fused(fused_linear_cross_entropy, W, hidden, labels, proj, 10, "torch")
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_vocab_parallel_errors_name_the_argument(tiny_store):
    W, hidden, labels, proj = _kernel_data(45, 48)
    with pytest.raises(ValueError, match="divisible"):
        vocab_range(65, 0, 2)
    with pytest.raises(ValueError, match="vocab_start=24 but the TP group has one rank"):
        vocab_parallel_fused_linear_cross_entropy(hidden, W[24:], labels, vocab_start=24)
    with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
        vocab_parallel_fused_linear_cross_entropy(hidden, W, labels, vocab_start=-1)
    with pytest.raises(ValueError, match="outside P1"):
        vocab_parallel_capture(nn.Linear(D, 8), proj, lambda g, c: None, vocab_start=44, vocab_end=52)
    mixer = _glue_mixer(str(tiny_store))
    batch = mixer.next_step()[0]
    hidden, W, labels = _glue_data(batch)
    with pytest.raises(ValueError, match="labels must be"):
        vocab_parallel_lm_head_loss(mixer, hidden, W, labels[:, :4], batch.domain_ids, vocab_start=0,
                                    vocab_end=GLUE_V_PAD)
    with pytest.raises(ValueError, match="has 40 rows but the weight shard has 20"):
        vocab_parallel_lm_head_loss(mixer, hidden, W[:20], labels, batch.domain_ids, vocab_start=0,
                                    vocab_end=GLUE_V_PAD)
    with pytest.raises(ValueError, match="domain_ids"):
        vocab_parallel_lm_head_loss(mixer, hidden.requires_grad_(True), W, labels, vocab_start=0, vocab_end=GLUE_V_PAD)
    with pytest.raises(ValueError, match="no output_size/input_size"):
        attach_megatron(HeadOnlyGPT(nn.Linear(GLUE_D, GLUE_V_PAD)), mixer)

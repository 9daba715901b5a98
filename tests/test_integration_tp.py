"""Vocab-parallel LM head: 2 simulated TP ranks (gloo, torch.multiprocessing) equal the unsharded run."""
from __future__ import annotations

import os
import socket
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.projection import Projection
from megamix.integrations.hook import LMHeadGradCapture
from megamix.integrations.tensor_parallel import (vocab_parallel_capture, vocab_parallel_cross_entropy,
                                                  vocab_range)

V, D, B, T, K1, K2 = 64, 12, 3, 5, 4, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(V, D, generator=g) * 0.5
    a = torch.randn(B, T, D, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, :2] = -100
    proj = Projection(torch.randn(K1, V, generator=g), torch.randn(K2, D, generator=g), kind="gaussian")
    return W, a, labels, proj


def _reference():
    W, a, labels, proj = _data()
    head = nn.Linear(D, V, bias=False)
    head.weight.data.copy_(W)
    got = []
    cap = LMHeadGradCapture(head, proj, lambda g, c: got.append(g))
    a = a.clone().requires_grad_(True)
    logits = head(a)
    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(B, T)
    loss = tok.sum() / (labels != -100).sum()
    loss.backward()
    cap.remove()
    return tok.detach(), head.weight.grad.clone(), a.grad.clone(), got[0]


def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        W, a, labels, proj = _data()
        s, e = vocab_range(V, rank, world)
        shard = nn.Linear(D, e - s, bias=False)
        shard.weight.data.copy_(W[s:e])
        got = []
        vocab_parallel_capture(shard, proj, lambda g, c: got.append((g, c)), vocab_start=s, vocab_end=e)
        LMHeadGradCapture.attached(shard).set_context(("tp", rank))
        a = a.clone().requires_grad_(True)
        tok = vocab_parallel_cross_entropy(shard(a), labels, vocab_start=s)
        loss = tok.sum() / (labels != -100).sum()
        loss.backward()
        a_grad = a.grad.clone()
        dist.all_reduce(a_grad)  # Megatron's copy-to-TP-region backward does this all-reduce
        torch.save({"tok": tok.detach(), "wgrad": shard.weight.grad, "agrad": a_grad, "g": got[0][0],
                    "ctx": got[0][1], "range": (s, e)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_equals_unsharded(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    mp.spawn(_tp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    tok, wgrad, agrad, g = _reference()
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        s, e = res["range"]
        assert res["ctx"] == ("tp", r)
        torch.testing.assert_close(res["tok"], tok, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["wgrad"], wgrad[s:e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["agrad"], agrad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["g"], g, rtol=1e-4, atol=1e-6)


def test_vocab_parallel_single_rank_and_errors():
    W, a, labels, proj = _data()
    tok_ref, _, _, _ = _reference()
    logits = (a @ W.t()).requires_grad_(True)
    tok = vocab_parallel_cross_entropy(logits, labels, vocab_start=0)
    torch.testing.assert_close(tok.detach(), tok_ref, rtol=1e-5, atol=1e-6)
    tok.sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref.reshape(-1, V), labels.reshape(-1), reduction="sum").backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        vocab_range(65, 0, 2)
    with pytest.raises(ValueError):
        vocab_parallel_capture(nn.Linear(D, 8), proj, lambda g, c: None, vocab_start=60, vocab_end=70)

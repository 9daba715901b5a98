"""Megatron layouts on a CPU: 4 gloo ranks laid out by megatron-core's own ``parallel_state`` (its subgroups, as
``pretrain_gpt.py`` gets them), as TP=2 × DP=2 and as PP=2 × DP=2.

Each rank builds its Mixer as examples/megatron_pretrain_gpt_patch.md section 1 says (data-parallel rank, size
and group; the pipeline group), trains a few rounds and records its micro-batches and weights:

- TP=2 × DP=2 (TP groups {0,1}, {2,3}; DP groups {0,2}, {1,3}): the vocab-parallel fused loss runs on the TP
  groups, ``Mixer.step`` on every rank's DP group. The DP group {1,3} does not hold global rank 0: a broadcast
  with ``src=0`` (global) raised "Global rank 0 is not part of group" there before megamix.comm.
- PP=2 × DP=2 (stage 0 = ranks {0,1}, stage 1 = ranks {2,3}; DP groups {0,1}, {2,3}; pipeline groups {0,2},
  {1,3}): the LM head and the statistics are on the last stage only, whose DP group {2,3} does not hold global
  rank 0; the earlier stage receives the decision through the pipeline group.

Checked in both: the same weights on all 4 ranks after every round (and they move), the same micro-batches on
ranks that share a DP rank, different ones across DP ranks; with TP the same loss on both TP ranks.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from ranks import free_port as _free_port, spawn

pytest.importorskip("megatron.core")

WORLD = 4
V, D = 256, 16      # a 256-row vocabulary (token ids folded), divisible by TP=2
# the vocab-parallel fused loss does not reweight gradients (DoGraph), so TP runs the sampling variant; DoGraph's
# cluster table is broadcast on the pipeline layout, whose deciding DP group {2, 3} does not hold global rank 0 either
STRATEGIES = {"tp2_dp2": ("rnb", "dograph-sample"), "pp2_dp2": ("rnb", "dograph")}



def _mixer(data_dir: str, strategy: str):
    from megatron.core import parallel_state as mpu

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={data_dir}", "model.seq_len=12", "train.global_batch_size=8", "train.micro_batch_size=2",
        "projection.k1=8", "projection.k2=4", f"mixing.strategy={strategy}", "mixing.update_every=1",
        "mixing.min_weight=0", "mixing.dograph_reservoir=8"]).validate()
    return Mixer(cfg, TokenStore(Path(data_dir) / "tokens"), rank=mpu.get_data_parallel_rank(),
                 world_size=mpu.get_data_parallel_world_size(), group=mpu.get_data_parallel_group(),
                 pipeline_group=mpu.get_pipeline_model_parallel_group())


def _model():
    torch.manual_seed(0)      # the same replicated hidden states and the same full head on every rank
    return torch.nn.Embedding(V, D), torch.nn.Parameter(torch.randn(V, D) / 4)


def _labels(batch):
    labels = batch.labels % V
    labels[batch.labels < 0] = -100
    return labels


def _tp_dp(data_dir: str, strategy: str, steps: int) -> dict:
    from megatron.core import parallel_state as mpu

    from megamix.integrations.megatron import vocab_parallel_lm_head_loss, vocab_range

    mixer = _mixer(data_dir, strategy)
    emb, W = _model()
    tp_group = mpu.get_tensor_model_parallel_group()
    start, end = vocab_range(V, mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size())
    shard = torch.nn.Parameter(W.detach()[start:end].clone())
    out = {"samples": [], "weights": [], "losses": []}
    for step in range(steps):
        for batch in mixer.next_step():
            hidden = emb(batch.input_ids % V).transpose(0, 1)                 # Megatron's [s, b, h]
            loss = vocab_parallel_lm_head_loss(mixer, hidden, shard, _labels(batch), batch.domain_ids,
                                               batch.sample_ids, vocab_start=start, vocab_end=end, tp_group=tp_group)
            loss.backward()
            out["samples"].append(batch.sample_ids.tolist())
            out["losses"].append(float(loss))
        mixer.step(step)
        out["weights"].append(mixer.weights.tolist())
    return out


def _pp_dp(data_dir: str, strategy: str, steps: int) -> dict:
    from megatron.core import parallel_state as mpu

    mixer = _mixer(data_dir, strategy)
    emb, W = _model()
    last = mpu.is_pipeline_last_stage()
    out = {"samples": [], "weights": [], "losses": [], "last_stage": last}
    for step in range(steps):
        for batch in mixer.next_step():                # both stages draw: stage 0 the inputs, the last the labels
            out["samples"].append(batch.sample_ids.tolist())
            if last:                                  # the LM head lives on the last stage
                loss = mixer.lm_head_loss(emb(batch.input_ids % V), W, _labels(batch), batch.domain_ids,
                                          batch.sample_ids)
                loss.backward()
                out["losses"].append(float(loss))
        mixer.step(step)                               # every stage: the last decides and sends
        out["weights"].append(mixer.weights.tolist())
    return out


def _worker(rank: int, port: int, data_dir: str, root: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    res = {}
    try:
        for layout, kw, run in (("tp2_dp2", {"tensor_model_parallel_size": 2}, _tp_dp),
                                ("pp2_dp2", {"pipeline_model_parallel_size": 2}, _pp_dp)):
            mpu.initialize_model_parallel(**kw)
            res[layout] = {"dp_rank": mpu.get_data_parallel_rank(),
                           "dp_group": dist.get_process_group_ranks(mpu.get_data_parallel_group())}
            for strategy in STRATEGIES[layout]:
                res[layout][strategy] = run(data_dir, strategy, steps=3)
            mpu.destroy_model_parallel()
    finally:
        Path(root, f"rank{rank}.json").write_text(json.dumps(res))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def layouts(tiny_store, tmp_path_factory):

    root = tmp_path_factory.mktemp("megatron_layouts")
    spawn(_worker, (_free_port(), str(tiny_store.parent), str(root)), WORLD)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _check(res: list[dict], layout: str, strategy: str) -> None:
    runs = [r[layout][strategy] for r in res]
    dp = [r[layout]["dp_rank"] for r in res]
    for i in range(1, WORLD):
        assert runs[i]["weights"] == runs[0]["weights"], f"{layout}/{strategy}: rank {i} holds other weights"
    assert runs[0]["weights"][-1] != runs[0]["weights"][0] or strategy == "dograph"   # DoGraph keeps the weights
    for i in range(WORLD):
        for j in range(WORLD):
            same = runs[i]["samples"] == runs[j]["samples"]
            assert same == (dp[i] == dp[j]), f"{layout}/{strategy}: ranks {i}, {j} (DP ranks {dp[i]}, {dp[j]})"


def test_tp2_dp2_every_rank_ends_each_round_with_the_same_weights(layouts):
    assert [r["tp2_dp2"]["dp_group"] for r in layouts] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    for strategy in STRATEGIES["tp2_dp2"]:
        _check(layouts, "tp2_dp2", strategy)
        runs = [r["tp2_dp2"][strategy] for r in layouts]
        assert runs[0]["losses"] == runs[1]["losses"] and runs[2]["losses"] == runs[3]["losses"]   # TP groups


def test_pp2_dp2_the_last_stage_decides_for_every_stage(layouts):
    assert [r["pp2_dp2"]["dp_group"] for r in layouts] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp2_dp2"]["rnb"]["last_stage"] for r in layouts] == [False, False, True, True]
    for strategy in STRATEGIES["pp2_dp2"]:
        _check(layouts, "pp2_dp2", strategy)

"""DoGraph's in-step reweighting in the one training loop: 2 gloo ranks (DeepSpeed ZeRO-1) against the
plain backend in one process over the same global batches.

The cluster table (centroids, π, q) refreshed every round is bit-identical on both ranks, and equal to
the single-process one to fp32 round-off; every step's loss matches the single-process run, and once
the clusters exist the losses leave those of an unweighted run (the weights reach the model).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from test_integration_deepspeed import WORLD, _cfg, _free_port, _setup_rank  # noqa: E402
from ranks import spawn

DOGRAPH = ("mixing.strategy=dograph", "mixing.dograph_reservoir=12", "train.steps=4")


def _clusters(out_dir: Path, rank: int) -> dict:
    side = torch.load(out_dir / "checkpoints" / "step_0000004" / f"megamix_rank{rank:05d}.pt", map_location="cpu",
                      weights_only=False)
    return side["mixer"]["strategy"]["clusters"]


def _worker(rank: int, port: int, data_dir: str, root: str) -> None:
    _setup_rank(rank, port)
    from megamix.train.loop import train

    r = train(_cfg(data_dir, f"{root}/ds", 1, *DOGRAPH), rank=rank, world_size=WORLD, progress=False,
              log_to_stdout=False)
    Path(root, f"ds_rank{rank}.json").write_text(json.dumps({"losses": r.step_losses, "path": r.lm_head_path,
                                                             "weights": r.weights}))


def test_dograph_two_ranks_equal_single_process(tmp_path, tiny_store):
    from megamix.train.loop import train

    spawn(_worker, (_free_port(), str(tiny_store.parent), str(tmp_path)), WORLD)
    ds = [json.loads((tmp_path / f"ds_rank{r}.json").read_text()) for r in range(WORLD)]
    data = str(tiny_store.parent)
    plain = train(_cfg(data, str(tmp_path / "plain"), 1, "deepspeed.enabled=false", *DOGRAPH), progress=False,
                  log_to_stdout=False)
    static = train(_cfg(data, str(tmp_path / "static"), 1, "deepspeed.enabled=false", "mixing.strategy=static",
                        "train.steps=4"), progress=False, log_to_stdout=False)
    assert ds[0]["path"] == plain.lm_head_path == "fused"
    # the domain sampling weights never move (the reweighting acts on the gradient)
    assert ds[0]["weights"] == ds[1]["weights"] and len(plain.weight_history) == 1
    # the cluster table: bit-identical on the ranks, equal to the single process's
    c0, c1, cp = _clusters(tmp_path / "ds", 0), _clusters(tmp_path / "ds", 1), _clusters(tmp_path / "plain", 0)
    assert c0 == c1
    for key in ("centroids", "cluster_weights", "cluster_shares"):
        np.testing.assert_allclose(c0[key], cp[key], rtol=1e-4, atol=1e-5)
    assert len(c0["cluster_weights"]) >= 2
    # the same training: every step's loss equals the single-process run
    np.testing.assert_allclose(ds[0]["losses"], plain.step_losses, rtol=2e-5)
    # rounds end at steps 2 and 4: until step 2 the run is the unweighted one, after it it is not
    np.testing.assert_allclose(plain.step_losses[:2], static.step_losses[:2], rtol=1e-6)
    assert abs(plain.step_losses[3] - static.step_losses[3]) > 1e-4
    recs = [json.loads(x) for x in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    mixing = [r for r in recs if r["kind"] == "mixing"]
    assert [m["step"] for m in mixing] == [2, 4] and all("cluster_weights" in m for m in mixing)

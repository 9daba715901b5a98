"""benchmarks/bench_dograph_weighting.py runs end to end (tiny sizes) and reports what it measured."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_dograph_weighting_tiny(tiny_store, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_dograph_weighting",
                                                  ROOT / "benchmarks" / "bench_dograph_weighting.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    rep = bench.main(["--data-dir", str(tiny_store.parent), "--steps", "2", "--warmup", "1", "--n-layer", "1",
                      "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--vocab", "50257", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    assert set(rep["median_step_seconds"]) == set(bench.VARIANTS)
    assert all(t > 0 for t in rep["median_step_seconds"].values())
    assert set(rep["weighted_vs_unweighted"]) == {"fused+w", "fused_small+w", "capture+w"}
    # the weighted variants really weighted (mean weight 1 over the samples)
    assert all(abs(m - 1.0) < 1e-5 for m in rep["mean_weight_check"].values())
    assert rep["gpu"] == "not measured on GPU" and rep["conditions"]["torch"]

"""benchmarks/bench_lm_head_paths.py runs end to end (tiny sizes) and reports what it measured."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lm_head_paths_tiny(tiny_store, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lm_head_paths", ROOT / "benchmarks" / "bench_lm_head_paths.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    rep = bench.main(["--data-dir", str(tiny_store.parent), "--nproc", "1", "--steps", "3", "--warmup", "1",
                      "--repeats", "1", "--vocab", "50257", "--set", "model.n_layer=1", "--set", "model.n_embd=32",
                      "--set", "model.n_head=2", "--set", "model.seq_len=32", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    (r,) = rep["results"]
    assert r["lm_head_path"] == {"torch": "torch", "capture": "capture", "fused": "fused"}
    assert r["steps_measured"] == {"torch": 2, "capture": 2, "fused": 2}
    assert all(t > 0 for t in r["median_step_seconds"].values())
    assert r["overhead_vs_torch"]["torch"] == 0.0
    assert all(m > 50 for m in r["peak_rss_mb_rank0"].values())
    assert rep["conditions"]["torch"] and rep["conditions"]["cpu_count"]

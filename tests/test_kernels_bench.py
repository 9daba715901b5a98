"""Smoke test of the kernel microbenchmark on CPU at tiny shapes (results are not asserted, only their form)."""
import json

import torch

from megamix.kernels.bench.args import build_parser
from megamix.kernels.bench.bench_fused_lce import _cpu_projection_case, bench_shape, write_results


def test_bench_shape_cpu_smoke(tmp_path):
    rows = bench_shape(96, 16, 40, [(4, 4)], ["fused+proj", "fused", "eager+proj", "nonsense"], torch.float32,
                       16, "torch", 0, 1, torch.device("cpu"))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"fused+proj 4x4", "fused", "eager+proj 4x4", "nonsense"}
    assert by["fused"]["error"] is None and by["fused"]["full_ms"] > 0
    assert by["nonsense"]["error"].startswith("ValueError")
    assert "overhead_pct_vs_fused" in by["fused+proj 4x4"]
    jp, cp = write_results(tmp_path, "t", {"torch": "x", "triton": "y", "date": "z"}, rows, {})
    assert len(json.loads(jp.read_text())["rows"]) == 4 and cp.read_text().count("\n") == 5


def test_cpu_projection_case_agrees_between_methods():
    f = _cpu_projection_case("factored", 4, 4, V=256, d=32, B=2, T=8, reps=1)
    m = _cpu_projection_case("materialise", 4, 4, V=256, d=32, B=2, T=8, reps=1)
    assert abs(f["g_checksum"] - m["g_checksum"]) <= 1e-4 * max(1.0, abs(m["g_checksum"]))
    assert m["intermediate_mb"] > f["intermediate_mb"]


def test_bench_args_parse():
    a = build_parser().parse_args(["--k", "32x32,128x64", "--V", "100,200", "--shapes", "1:2:3"])
    assert a.k == [(32, 32), (128, 64)] and a.V == [100, 200] and a.shapes == "1:2:3"

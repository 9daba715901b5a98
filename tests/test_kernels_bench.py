"""Smoke test of the kernel microbenchmark on CPU at tiny shapes (results are not asserted, only their form)."""
import json

import torch

from megamix.kernels.bench.args import build_parser
from megamix.kernels.bench.bench_fused_lce import _cpu_projection_case, bench_shape, write_results


def test_bench_shape_cpu_smoke(tmp_path):
    rows = bench_shape(96, 16, 40, [(4, 4)], ["fused+proj", "fused", "eager+proj", "floor", "nonsense"], torch.float32,
                       16, "torch", 0, 1, torch.device("cpu"), chunks=[16, 32], u_methods=["fused", "gemm", "augmented"])
    by = {(r["method"], r["chunk_tokens"]): r for r in rows}
    assert rows[0]["method"] == "floor"      # the floor is timed first
    expect = {("floor", 16), ("floor", 32), ("fused", 16), ("fused", 32), ("eager+proj 4x4", None), ("nonsense", None)}
    expect |= {(f"fused+proj{tag} 4x4", c) for tag in ("", "[gemm]", "[augmented]") for c in (16, 32)}
    assert set(by) == expect
    assert by[("fused", 16)]["error"] is None and by[("fused", 16)]["full_ms"] > 0
    assert by[("nonsense", None)]["error"].startswith("ValueError")
    for c in (16, 32):
        r = by[("fused+proj[augmented] 4x4", c)]
        assert r["u_method"] == "augmented" and r["error"] is None
        fused, floor = by[("fused", c)]["full_ms"], by[("floor", c)]["full_ms"]
        assert abs(r["overhead_pct_vs_fused"] - 100 * (r["full_ms"] / fused - 1)) < 1e-9
        assert abs(r["ratio_vs_floor"] - r["full_ms"] / floor) < 1e-12
        best_floor = min(by[("floor", 16)]["full_ms"], by[("floor", 32)]["full_ms"])
        assert abs(r["ratio_vs_best_floor"] - r["full_ms"] / best_floor) < 1e-12
    assert "overhead_pct_vs_fused" not in by[("floor", 16)]
    jp, cp = write_results(tmp_path, "t", {"torch": "x", "triton": "y", "date": "z"}, rows, {})
    assert len(json.loads(jp.read_text())["rows"]) == len(rows) and cp.read_text().count("\n") == len(rows) + 1


def test_floor_does_the_fused_steps_gemms():
    """The floor's dW equals the sum over chunks of logitsᵀ x, i.e. the GEMMs really run on the full shapes."""
    from megamix.kernels.bench.bench_fused_lce import _floor_method
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    fwd, _, _ = _floor_method(h, W, 16)
    torch.testing.assert_close(fwd(), (h @ W.t()).t() @ h, rtol=1e-5, atol=1e-5)


def test_cpu_projection_case_agrees_between_methods():
    f = _cpu_projection_case("factored", 4, 4, V=256, d=32, B=2, T=8, reps=1)
    m = _cpu_projection_case("materialise", 4, 4, V=256, d=32, B=2, T=8, reps=1)
    assert abs(f["g_checksum"] - m["g_checksum"]) <= 1e-4 * max(1.0, abs(m["g_checksum"]))
    assert m["intermediate_mb"] > f["intermediate_mb"]


def test_bench_args_parse():
    a = build_parser().parse_args(["--k", "32x32,128x64", "--V", "100,200", "--shapes", "1:2:3", "--chunks",
                                   "4096,16384", "--u-methods", "fused,tiled"])
    assert a.k == [(32, 32), (128, 64)] and a.V == [100, 200] and a.shapes == "1:2:3"
    assert a.chunks == [4096, 16384] and a.u_methods == "fused,tiled"


def test_bench_domain_gram_cpu_smoke(tmp_path):
    """The per-sample reduction runs on CPU (torch backend) against its bmm baseline, with the baseline's result."""
    from megamix.kernels.bench.bench_domain_gram import bench_case, build_parser, main
    rows = bench_case(64, 16, 4, 4, torch.device("cpu"), ["torch"], 0, 2)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"per_sample[bmm]", "per_sample[torch]"}
    assert all(r["error"] is None and r["ms"] > 0 for r in rows)
    assert by["per_sample[bmm]"]["ratio_vs_baseline"] == 1.0
    assert by["per_sample[torch]"]["max_rel_err"] < 1e-5
    args = build_parser().parse_args(["--cpu", "--shapes", "64:16", "--k", "4x4", "--iters", "1",
                                      "--warmup", "0", "--out-dir", str(tmp_path)])
    assert main(args) == 0
    res = json.loads((tmp_path / "bench_domain_gram_cpu.json").read_text())
    assert len(res["rows"]) == 2 and res["meta"]["pinned"] == {"torch": "2.13.0", "triton": "3.7.1"}

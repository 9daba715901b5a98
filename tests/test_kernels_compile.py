"""The compile gate (kernels/compile_gate.py; what it compiles: kernels/compile_jobs.py) in the default suite:
every Triton kernel, at every launch configuration the launchers can choose, compiled ahead of time for sm_80 (A100),
sm_90 (H100/H200) and sm_100 (B200) on this CPU machine, and held to the shared-memory limits and the spill budget.

The gate runs once per module, in a subprocess without TRITON_INTERPRET (conftest.py sets it for the rest of the
suite, and ``triton.compile`` cannot take interpreter objects), on every CPU.
"""
import json
import re
import time
from pathlib import Path

import pytest
import torch

from megamix.config import MegamixConfig, ProjectionConfig
from megamix.configbase import ConfigError
from megamix.kernels import compile_gate as cg
from megamix.kernels import compile_jobs as cj
from megamix.kernels import launch_configs as lc
from megamix.kernels.utils import HAS_TRITON, next_pow2

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
ROOT = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def gate():
    t = time.perf_counter()
    doc = cg.run_gate()
    doc["elapsed_s"] = time.perf_counter() - t
    print(f"\ncompile gate: {len(doc['records'])} compiles in {doc['elapsed_s']:.1f} s "
          f"({doc['compile_s_total']} s of compiling on {doc['workers']} processes), triton {doc['triton']}")
    return doc


def _launch(doc):
    return [r for r in doc["records"] if r["role"] == "launch"]


def test_every_kernel_compiles_for_every_target(gate):
    errors = [f"{cg.describe(r)}: {r['error']}" for r in gate["records"] if r["error"]]
    assert not errors, "\n".join(errors)
    kernels = {"_ce_delta_proj_kernel", "_ce_shard_stats_kernel", "_ce_shard_delta_kernel", "_proj_u_kernel",
               "_segment_outer_kernel"}
    if hasattr(lc, "scale"):
        kernels.add("_scale_kernel")
    for cap in cg.TARGETS:
        assert {r["kernel"] for r in _launch(gate) if r["cap"] == cap} == kernels, cap


def test_every_launch_configuration_fits_shared_memory(gate):
    over = [f"{cg.describe(r)}: {r['shared']} B > {r['shared_limit']} B" for r in _launch(gate) if not r["fits"]]
    assert not over, "\n".join(over)
    assert not gate["problems"], "\n".join(gate["problems"])


def test_spills_within_budget(gate):
    """Spill budget: at most DEFAULT_SPILL_BUDGET (16 B) of spill stores per thread in the default configurations
    (no projection; k1 = 32 / 64; k2 16 / 32 / 64; the scale kernel) on every target. Every other spill is printed
    here, and pinned by the committed tables (test_committed_tables_are_the_gates fails when one changes)."""
    spills = [r for r in _launch(gate) if (r["spill_stores"] or 0) > 0]
    for r in sorted(spills, key=lambda r: -r["spill_stores"]):
        print(f"spill: {cg.describe(r)}: {r['spill_stores']} B stores / {r['spill_loads']} B loads per thread"
              + (" (default configuration)" if cg.is_default(r) else ""))
    default = [cg.describe(r) for r in spills if cg.is_default(r) and r["spill_stores"] > lc.DEFAULT_SPILL_BUDGET]
    assert not default, "default configurations spill:\n" + "\n".join(default)
    assert all(r["registers"] for r in _launch(gate)), "ptxas reported no register count"
    # the defaults on the GPUs the tiles were tuned on (sm_90) and the A100 do not spill at all
    assert not [r for r in spills if cg.is_default(r) and r["cap"] in (80, 90) and r["kernel"] != "_proj_u_kernel"]


def test_launchers_choose_only_what_the_gate_compiled(gate):
    """For every accepted k1 of every dtype (and k1, k2 of segment_outer), the launchers' configuration is the one
    the gate compiled for that kernel, dtype and bucket on every target (directly, or through the proxy that
    test_proxies_have_the_same_shared_memory checks); the first k1 above the limit is refused."""
    compiled = {}
    for r in _launch(gate):
        if r["variant"] == "aligned":
            b1 = r["bk1"] if (r["has_proj"] or r["bk2"]) else None
            key = (r["kernel"], r["dtype"], b1 * r["bk2"] if r["bk2"] else b1, r["bk2"] is not None)
            compiled.setdefault(key, {}).setdefault(r["cap"], set()).add(tuple(r["config"]))

    def expect(kernel, dt, bucket, cfg, seg=False):
        proxy = (kernel, dt)
        if dt == "fp16":
            proxy = (proxy[0], "bf16")
        if kernel == "_ce_shard_delta_kernel" and bucket is not None:
            proxy = ("_ce_delta_proj_kernel", proxy[1])
        for cap in cg.TARGETS:
            k, d = (kernel, dt) if cap == cg.FULL_TARGET else proxy
            got = compiled.get((k, d, bucket, seg), {}).get(cap)
            assert got == {tuple(cfg)}, f"{kernel} {dt} bucket {bucket} on sm_{cap}: launcher {cfg}, gate {got}"

    for dt, tdt in TORCH_DTYPES.items():
        cfg = lc.ce_pass(4096, tdt, None, interpret=False)
        for kern in ("_ce_delta_proj_kernel", "_ce_shard_delta_kernel", "_ce_shard_stats_kernel"):
            expect(kern, dt, None, cfg)
        for k1 in range(1, lc.max_k1(tdt) + 1):
            for C in (1, 4096):
                cfg = lc.ce_pass(C, tdt, k1, interpret=False)
                expect("_ce_delta_proj_kernel", dt, next_pow2(k1, 16), cfg)
                expect("_ce_shard_delta_kernel", dt, next_pow2(k1, 16), cfg)
                expect("_proj_u_kernel", dt, next_pow2(k1, 16), lc.proj_u(C, 128256, tdt, k1, interpret=False))
        with pytest.raises(ValueError, match=r"largest k1 that fits every supported GPU is"):
            lc.ce_pass(4096, tdt, lc.max_k1(tdt) + 1, interpret=False)
        with pytest.raises(ValueError, match=r"largest k1 that fits every supported GPU is"):
            lc.proj_u(4096, 128256, tdt, lc.max_k1(tdt) + 1, interpret=False)
        if dt != "fp32" and hasattr(lc, "scale"):
            expect("_scale_kernel", dt, None, lc.scale(tdt, interpret=False))
    # segment_outer: its configuration is a function of BK1·BK2; every accepted (k1, k2) maps onto a class the
    # gate compiled (at the class's most skewed pairs), with that class's configuration
    k1_hi = max(lc.max_k1(d) for d in TORCH_DTYPES)
    n = 0
    for k1 in range(1, k1_hi + 1):
        for k2 in range(1, lc.MAX_K2 + 1):
            b1, b2 = next_pow2(k1, 16), next_pow2(k2, 16)
            if (k1 > 64 and k1 not in (b1, b1 // 2 + 1)) or (k2 > 64 and k2 not in (b2, b2 // 2 + 1)):
                continue     # inside a bucket above 64: the bucket's edges stand for it
            if b1 * b2 > lc.MAX_K1K2:
                with pytest.raises(ValueError, match="segment_outer supports"):
                    lc.segment_outer(k1, k2, interpret=False)
                continue
            expect("_segment_outer_kernel", "fp32", b1 * b2, lc.segment_outer(k1, k2, interpret=False), seg=True)
            n += 1
    assert n > 1000
    with pytest.raises(ValueError, match="segment_outer supports"):
        lc.segment_outer(1, lc.MAX_K2 + 1, interpret=False)


def test_proxies_have_the_same_shared_memory(gate):
    """On the full target (sm_90) the proxies the other targets compile instead are checked: fp16 needs exactly
    what bf16 needs; the vocab-parallel δ kernel what the single-device one needs (aligned sizes); segment_outer
    with a row order no more than without."""
    recs = {(r["kernel"], r["dtype"], r["bk1"], r["bk2"], r["has_order"], r["variant"]): r
            for r in _launch(gate) if r["cap"] == cg.FULL_TARGET}
    n = 0
    for (kern, dt, b1, b2, order, var), r in recs.items():
        if dt == "fp16":
            assert r["shared"] == recs[(kern, "bf16", b1, b2, order, var)]["shared"], cg.describe(r)
            n += 1
        if kern == "_ce_shard_delta_kernel" and r["has_proj"] and var == "aligned":
            assert r["shared"] == recs[("_ce_delta_proj_kernel", dt, b1, b2, order, var)]["shared"], cg.describe(r)
            n += 1
        if kern == "_segment_outer_kernel" and order:
            assert r["shared"] <= recs[(kern, dt, b1, b2, False, var)]["shared"], cg.describe(r)
            n += 1
    assert n > 50


def test_interpreter_configs_are_unchanged():
    """The interpreter branch (the CPU test suite's tiles) does not depend on the resource tables."""
    for dt in TORCH_DTYPES.values():
        for C in (1, 16, 100, 4096):
            for k1 in (None, 1, 64, 100000):
                assert lc.ce_pass(C, dt, k1, interpret=True) == (min(64, next_pow2(C, 16)), 64, 4, None)
            assert lc.proj_u(C, 5000, dt, 100000, interpret=True) == (min(64, next_pow2(C, 16)), 64, 4, None)
    assert lc.segment_outer(100000, 100000, interpret=True) == (64, 0, 4, None)


def test_fp32_k1_64_fits_an_a100_now(gate):
    """The regression the gate exists for: with the old launch configuration (16x256, 8 warps, Triton's default 3
    stages) fp32 logits with k1 = 64 needed 176 KB of shared memory, above the A100's 163 KB (OutOfResources at
    the first step); every k1 bucket of every dtype now fits every target."""
    recs = [r for r in _launch(gate) if r["kernel"] == "_ce_delta_proj_kernel" and r["dtype"] == "fp32"
            and r["bk1"] == 64 and r["cap"] == 80 and r["variant"] == "aligned"]
    assert len(recs) == 1 and recs[0]["fits"], recs
    assert recs[0]["shared"] <= lc.SHARED_MEMORY_LIMITS[80]
    for dt in TORCH_DTYPES:
        buckets = {r["bk1"] for r in _launch(gate) if r["kernel"] == "_ce_delta_proj_kernel" and r["dtype"] == dt
                   and r["has_proj"] and r["cap"] == cg.FULL_TARGET}
        assert buckets == set(cj._pow2_buckets(lc.max_k1(dt))), (dt, buckets)


def test_first_k1_above_the_limit_does_not_fit(gate):
    """max_k1 is the real limit: at BK1 = 2·max_k1 even the policy's smallest tile (the least shared memory) of
    each k1 kernel is above the A100's limit, by the number launch_configs.REFUSED records (and validate() and the
    launchers' errors quote)."""
    for dt in TORCH_DTYPES:
        for kern, tile, need in lc.REFUSED[dt]:
            rec = [r for r in gate["records"] if r["role"] == "refused" and r["dtype"] == dt and r["cap"] == 80
                   and r["kernel"] == kern]
            assert len(rec) == 1, (dt, kern, rec)
            rec = rec[0]
            assert (tuple(rec["config"]), rec["bk1"]) == (tuple(tile), 2 * lc.max_k1(dt))
            assert not rec["fits"] and rec["shared"] == need, rec
            # and the smallest tile is the policy's last candidate (every other candidate is wider or deeper)
            cands = (lc.ce_candidates if kern == "_ce_delta_proj_kernel" else lc.proj_u_candidates)(rec["bk1"])
            assert cands[-1] == tile


def test_validate_refuses_the_first_k1_that_does_not_fit(gate):
    k1_max = lc.max_k1()          # the config does not know the logits dtype: the smallest over dtypes
    assert ProjectionConfig(k1=k1_max).validate()
    for u_method in ("fused", "tiled"):
        with pytest.raises(ConfigError) as e:
            ProjectionConfig(k1=k1_max + 1, u_method=u_method).validate()
        msg = str(e.value)
        print(msg)
        assert "\n" not in msg
        assert f"projection.k1={k1_max + 1}" in msg and "A100" in msg
        assert msg.endswith(f"the largest k1 that fits every supported GPU is {k1_max}") or \
            f"the largest k1 that fits every supported GPU is {k1_max} " in msg
        # the number quoted is what the gate measured for the dtype with the smallest limit
        d = min(lc.REFUSED, key=lambda x: lc.max_k1(x))
        kern = "_ce_delta_proj_kernel" if u_method == "fused" else "_proj_u_kernel"
        need = [r["shared"] for r in gate["records"] if r["role"] == "refused" and r["cap"] == 80
                and r["dtype"] == d and r["kernel"] == kern]
        quoted = int(re.search(r"needs at least (\d+) KB", msg).group(1))
        assert need and quoted == round(need[0] / 1024), (quoted, need)
    # no Triton kernel has k1 as a tile dimension with these: no limit
    assert ProjectionConfig(k1=4 * k1_max, u_method="gemm").validate()
    assert ProjectionConfig(k1=4 * k1_max, backend="torch").validate()


def test_shipped_configs_validate():
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = MegamixConfig.from_yaml(p)
        cfg.validate()
        assert cfg.projection.k1 <= lc.max_k1(), p


def test_committed_tables_are_the_gates(gate):
    """kernels/bench/results/compile_sm*.json are what the gate produces today (regenerate them with
    `python -m megamix.kernels.compile_gate --write-results`); kernels/README.md shows their summary."""
    for cap in cg.TARGETS:
        path = cg.RESULTS_DIR / f"compile_sm{cap}.json"
        assert path.exists(), path
        doc = json.loads(path.read_text())
        if doc["triton"] != gate["triton"]:
            pytest.skip(f"committed tables are for triton {doc['triton']}, this is {gate['triton']}")
        key = lambda r: (r["kernel"], r["role"], r["dtype"], r["bk1"], r["bk2"], r["has_order"], r["variant"],
                         tuple(r["config"]))
        fields = ("shared", "registers", "spill_stores", "fits")
        committed = {key(r): tuple(r[f] for f in fields) for r in doc["records"]}
        now = {key(r): tuple(r[f] for f in fields) for r in gate["records"] if r["cap"] == cap}
        assert committed == now, f"{path.name} is stale: run python -m megamix.kernels.compile_gate --write-results"
    readme = (ROOT / "kernels" / "README.md").read_text()
    assert cg.markdown_table(cg.load_results()) in readme, "kernels/README.md's table is stale (--markdown)"

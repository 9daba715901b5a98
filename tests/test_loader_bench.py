"""The loader benchmark (benchmarks/loader_bench.py, its one copy) runs and reports sane numbers (tiny sizes)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("loader_bench", ROOT / "benchmarks" / "loader_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_functions_smoke(tmp_path):
    bench = _load()
    ig = bench.bench_index_generation(5, 1000, 64, steps=5, repeats=2)
    sw = bench.bench_set_weights(5, 10**12, updates=10, repeats=2)
    asm = bench.bench_assembly(5000, 3, 64, 8, 4, steps=3, repeats=2, workdir=str(tmp_path))
    assert ig["samples_per_s"] > 0 and sw["us_per_set_weights"] > 0 and asm["tokens_per_s"] > 0
    assert ig["ratio_vs_naive"] > 0 and sw["ratio_after_update_vs_steady"] > 0 and asm["ratio_vs_index_generation"] > 0
    table = bench.format_table({"index_generation": [ig], "set_weights": [sw], "assembly": [asm]})
    assert "samples/s" in table and "set_weights" in table and "× naive" in table
    assert "load_average_1_5_15min" in bench.conditions()


def test_one_copy_in_benchmarks_not_in_the_library():
    assert importlib.util.find_spec("megamix.loader.bench") is None
    assert not (ROOT / "megamix" / "loader" / "bench.py").exists()

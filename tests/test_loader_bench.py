"""The loader benchmark's building blocks run and report sane numbers (tiny sizes)."""
from megamix.loader import bench


def test_bench_functions_smoke(tmp_path):
    ig = bench.bench_index_generation(5, 1000, 64, steps=5, repeats=2)
    sw = bench.bench_set_weights(5, 10**12, updates=10, repeats=2)
    asm = bench.bench_assembly(5000, 3, 64, 8, 4, steps=3, repeats=2, workdir=str(tmp_path))
    assert ig["samples_per_s"] > 0 and sw["us_per_set_weights"] > 0 and asm["tokens_per_s"] > 0
    table = bench.format_table({"index_generation": [ig], "set_weights": [sw], "assembly": [asm]})
    assert "samples/s" in table and "set_weights" in table
    assert "load_average_1_5_15min" in bench.conditions()

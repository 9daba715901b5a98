"""Benchmark the online weighted data loader; see megamix/loader/bench.py.

    python benchmarks/loader_bench.py [--quick] [--repeats 5] [--out benchmarks/results/loader_bench.json]
"""
import sys

from megamix.loader.bench import main

if __name__ == "__main__":
    sys.exit(main())

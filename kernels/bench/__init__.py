"""Microbenchmarks for the megamix kernels (``python -m kernels.bench.bench_fused_lce --help``)."""

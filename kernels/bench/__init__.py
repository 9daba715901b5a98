"""Microbenchmarks for the megamix kernels (``python -m megamix.kernels.bench.bench_fused_lce --help``)."""

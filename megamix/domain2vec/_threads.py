"""BLAS/OpenMP thread limiting for the small sklearn problems in Domain2Vec.

On a shared 2-core machine, multi-threaded OpenBLAS on small matrices (a few hundred rows) was
measured 100x slower than single-threaded (logistic regression: 2-4 s vs 0.02 s), because the
spinning worker threads compete with other processes. Domain2Vec's sklearn calls therefore run
inside :func:`blas_threads` (default 1 thread)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def blas_threads(n: int | None = 1):
    """Limit BLAS and OpenMP pools to ``n`` threads inside the block (``None`` = no limit)."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - sklearn depends on threadpoolctl
        yield
        return
    with threadpool_limits(limits=int(n)):
        yield

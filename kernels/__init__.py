"""megamix kernels: fused linear cross-entropy with factored per-sample gradient projection,
segmented per-sample / per-domain reductions, and their pure-torch references.

Modules (one op per file):
- :mod:`megamix.kernels.projection`: random projections ``P1 [k1,V]``, ``P2 [k2,d]`` (+ optional dense stage).
- :mod:`megamix.kernels.fused_linear_ce`: chunked fused linear-CE that also emits ``u = P1 δ`` and ``w = P2 a``;
  a vocab-parallel (tensor-parallel) variant with the distributed softmax.
- :mod:`megamix.kernels.domain_gram`: ``g_i = Σ_t u_t w_tᵀ`` and per-domain sums / Gram / counts.
"""
__all__ = ["Projection", "make_projection"]


def __getattr__(name):  # lazy, so that importing megamix.kernels.bench.args does not import torch
    if name in __all__:
        from megamix.kernels import projection
        return getattr(projection, name)
    raise AttributeError(f"module 'megamix.kernels' has no attribute {name!r}")

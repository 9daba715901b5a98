"""megamix kernels: fused linear cross-entropy with factored per-sample gradient projection, the segmented
per-sample reduction, and their pure-torch references. Installed as ``megamix.kernels``; in a checkout the symlink
``megamix/kernels -> ../kernels`` gives the same import without an install.

Modules (split by job; kernels/README.md has the file map):
- :mod:`megamix.kernels.projection`: random projections ``P1 [k1,V]``, ``P2 [k2,d]`` (+ optional dense stage).
- :mod:`megamix.kernels.fused_linear_ce`: chunked fused linear-CE that also emits ``u = P1 δ`` and ``w = P2 a``
  (the driver, autograd and public API), and its vocab-parallel (tensor-parallel) variant; its parts:
  :mod:`~megamix.kernels.ce_pass` (the CE pass), :mod:`~megamix.kernels.proj_u` (``u = δ P1ᵀ`` outside the CE
  pass), :mod:`~megamix.kernels.vocab_parallel` (the distributed-softmax CE pass), :mod:`~megamix.kernels.lce_chunk`
  (one chunk's GEMMs and operands).
- :mod:`megamix.kernels.domain_gram`: ``g_i = Σ_t u_t w_tᵀ`` per sample.
- :mod:`megamix.kernels.launch_configs`, :mod:`~megamix.kernels.compile_gate`, :mod:`~megamix.kernels.compile_jobs`:
  launch configurations and the ahead-of-time compile check of every one.
"""
__all__ = ["Projection", "make_projection"]


def __getattr__(name):  # lazy, so that importing megamix.kernels.bench.args does not import torch
    if name in __all__:
        from megamix.kernels import projection
        return getattr(projection, name)
    raise AttributeError(f"module 'megamix.kernels' has no attribute {name!r}")

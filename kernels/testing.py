"""The one tolerance table used by every kernel / stats test (CPU interpreter and GPU), and the per-domain
reference the statistics tests compare with (:func:`domain_stats_ref`).

A comparison passes when ``max|actual - expected| <= atol + rtol * max|expected|`` (a max-norm
relative test, robust to individual tiny entries). Keys are ``(quantity, dtype, device type)``.

Why these numbers:
- fp32 on CPU (torch path and the Triton interpreter, which computes ``tl.dot`` in full fp32): only
  summation-order differences, ~1e-6 relative; 1e-5 leaves room for N ≤ a few hundred tokens.
- fp32 on GPU: torch.mm in fp32 (TF32 off by default) and ``ieee`` tl.dot; reduction order differs
  over larger shapes, so 1e-4.
- bf16 on GPU: logits and δ are stored in bf16 (8 bits of mantissa, ~4e-3 relative per value)
  and dW is accumulated in bf16 across chunks, so errors of 1-3 % of the largest entry are expected.
- bf16 projections on CPU (the capture path's ``u = δ P1ᵀ`` with bf16 δ): the BLAS accumulates in fp32
  but rounds its output to bf16 once (CPU has no fp32-output bf16 GEMM in torch), so the bf16 GPU
  projection tolerance applies.
- bf16 autocast on CPU (the fused head's GEMMs in bf16, as ``F.linear`` under autocast): the bf16 GPU
  tolerances, for the same reasons.
"""
from __future__ import annotations

import torch

# (quantity, dtype, device) -> (atol, rtol)
TOLERANCES: dict[tuple[str, str, str], tuple[float, float]] = {
    ("loss", "fp32", "cpu"): (1e-6, 1e-5),
    ("grad", "fp32", "cpu"): (1e-7, 1e-5),
    ("proj", "fp32", "cpu"): (1e-7, 1e-5),   # u, w, g_i, sums, Gram
    ("loss", "fp32", "cuda"): (1e-5, 1e-4),
    ("grad", "fp32", "cuda"): (1e-6, 1e-4),
    ("proj", "fp32", "cuda"): (1e-6, 1e-4),
    ("loss", "bf16", "cuda"): (1e-3, 2e-2),
    ("grad", "bf16", "cuda"): (1e-5, 3e-2),
    ("proj", "bf16", "cuda"): (1e-5, 3e-2),
    ("proj", "bf16", "cpu"): (1e-5, 3e-2),
    # the head under bf16 autocast on CPU (bf16 logits, δ and GEMM operands; fp32 accumulation and dW): as on a GPU
    ("loss", "bf16", "cpu"): (1e-3, 2e-2),
    ("grad", "bf16", "cpu"): (1e-5, 3e-2),
}

# Monte Carlo unbiasedness: |mean estimate - exact| must be within this many standard errors.
MC_SIGMAS = 5.0

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp32"}


def tolerance(quantity: str, dtype: torch.dtype, device: torch.device | str) -> tuple[float, float]:
    """``(atol, rtol)`` for a quantity computed in ``dtype`` on ``device``."""
    dev = torch.device(device).type
    key = (quantity, _DT.get(dtype, str(dtype)), dev)
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for {key}; add it to kernels/testing.py TOLERANCES")
    return TOLERANCES[key]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, quantity: str, dtype: torch.dtype,
                 device: torch.device | str, what: str = "") -> None:
    """Max-norm relative comparison with the table's tolerance; raises AssertionError with details."""
    atol, rtol = tolerance(quantity, dtype, device)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError(f"{what}: non-finite values in the result")
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    bound = atol + rtol * scale
    if err > bound:
        raise AssertionError(f"{what}: max abs error {err:.3e} > {bound:.3e} (atol {atol:g} + rtol {rtol:g} "
                             f"x max|expected| {scale:.3e}) [{quantity}, {dtype}, {device}]")


def domain_stats_ref(g: torch.Tensor, domain_ids: torch.Tensor, num_domains: int):
    """Per-domain ``(sums [D,k], gram [D,D], counts [D])`` of per-sample rows ``g [B,k]`` with explicit Python loops
    (fp64): ``sums[d] = Σ_{i∈d} g_i``, ``gram = sums sumsᵀ``, ``counts[d]`` the samples of domain ``d`` (int64)."""
    sums = torch.zeros(num_domains, g.shape[1], dtype=torch.float64, device=g.device)
    counts = torch.zeros(num_domains, dtype=torch.int64, device=g.device)
    for i in range(g.shape[0]):
        sums[int(domain_ids[i])] += g[i].double()
        counts[int(domain_ids[i])] += 1
    return sums.to(g.dtype), (sums @ sums.t()).to(g.dtype), counts

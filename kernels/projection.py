"""Random factored projection of LM-head gradients: ``g = P1 G P2ᵀ`` (optionally followed by a
dense second stage ``R vec(g)``).

``P1`` is ``k1×V`` and ``P2`` is ``k2×d`` with i.i.d. entries of variance ``1/k`` (Rademacher
``±1/sqrt(k)`` or Gaussian ``N(0, 1/k)``), so ``E‖P1 G P2ᵀ‖² = ‖G‖²``. Matrices are drawn from a
CPU ``torch.Generator`` seeded with ``seed`` and then moved, so every rank and device gets
bit-identical values for the same arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megamix.kernels.utils import no_autocast

KINDS = ("rademacher", "gaussian")


def _draw(gen: torch.Generator, rows: int, cols: int, kind: str) -> torch.Tensor:
    """Unit-variance random matrix (±1 or N(0,1)) in fp32 on CPU."""
    if kind == "rademacher":
        return torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32)


@dataclass
class Projection:
    """A fixed factored projection.

    Attributes:
        P1: ``[k1, V]`` vocab-side matrix (entries of variance 1/k1).
        P2: ``[k2, d]`` hidden-side matrix (entries of variance 1/k2).
        R: optional ``[k, k1*k2]`` dense second stage (variance 1/k), or None.
        kind, seed: how it was generated.
    """

    P1: torch.Tensor
    P2: torch.Tensor
    R: torch.Tensor | None = None
    kind: str = "rademacher"
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: whether P1 and P2 hold exactly ±1/sqrt(k) (set by make_projection from its host draws; None = check once)
    exact_signs: bool | None = field(default=None, repr=False, compare=False)

    @property
    def k1(self) -> int:
        return self.P1.shape[0]

    @property
    def k2(self) -> int:
        return self.P2.shape[0]

    @property
    def V(self) -> int:
        return self.P1.shape[1]

    @property
    def d(self) -> int:
        return self.P2.shape[1]

    @property
    def k(self) -> int:
        """Output dimension of :meth:`finalize` (``R.shape[0]`` or ``k1*k2``)."""
        return self.R.shape[0] if self.R is not None else self.k1 * self.k2

    def to(self, device=None, dtype=None) -> "Projection":
        """A copy on another device / dtype (values are the same draws); the copy to a GPU does not block the
        host."""
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype, non_blocking=True)
        exact = self.exact_signs if dtype in (None, torch.float32) else None
        return Projection(mv(self.P1), mv(self.P2), mv(self.R), self.kind, self.seed, exact_signs=exact)

    def operand(self, which: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, float]:
        """``(Mᵀ contiguous [n, k] in dtype, scale)`` such that ``scale * Mᵀ`` equals ``P1ᵀ``/``P2ᵀ``.

        For Rademacher matrices ``Mᵀ`` holds exact ±1 signs (exact in bf16/fp16) and ``scale`` is
        ``1/sqrt(k)``, applied to the fp32 result; Gaussian matrices are returned as is (scale 1).
        Results are cached per (which, dtype, device)."""
        key = (which, dtype, str(device))
        if key not in self._cache:
            P = self.P1 if which == "P1" else self.P2
            k = P.shape[0]
            # A hand-built Projection may carry Gaussian values under the default kind: only take the
            # signs when every entry really is ±1/sqrt(k) (known from make_projection's host draws; else checked
            # here, once for both matrices).
            if self.exact_signs is None:
                self.exact_signs = self.kind == "rademacher" and all(
                    bool(torch.all(M.float().abs() == M.float().abs().max())) for M in (self.P1, self.P2))
            if self.kind == "rademacher" and self.exact_signs:
                scale = 1.0 / math.sqrt(k)
                M = torch.sign(P.float())
            else:
                scale = 1.0
                M = P.float()
            self._cache[key] = (M.t().contiguous().to(device=device, dtype=dtype), scale)
        return self._cache[key]

    def project_dense(self, G: torch.Tensor) -> torch.Tensor:
        """Materialise-then-project reference: ``P1 G P2ᵀ`` flattened (``G`` is ``[..., V, d]``)."""
        P1 = self.P1.to(G.device, G.dtype)
        P2 = self.P2.to(G.device, G.dtype)
        out = P1 @ G @ P2.t()
        return out.reshape(*G.shape[:-2], self.k1 * self.k2)

    def finalize(self, g: torch.Tensor) -> torch.Tensor:
        """Apply the optional dense second stage to per-sample rows ``g [B, k1*k2] -> [B, k]``."""
        if g.shape[-1] != self.k1 * self.k2:
            raise ValueError(f"finalize expects rows of k1*k2={self.k1 * self.k2}, got {tuple(g.shape)}")
        if self.R is None:
            return g
        with no_autocast(g.device):
            return g @ self.R.to(g.device, g.dtype).t()


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32. fp32 operands: a plain fp32 GEMM. bf16/fp16 operands: on CUDA a GEMM with an
    fp32 output (``out_dtype``, fp32 accumulation and no rounding of the result); elsewhere, or where that
    overload is missing, the GEMM in the operand dtype (the BLAS accumulates in fp32 and rounds the
    result once to the operand dtype), then upcast."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return (a @ b).float()


def accumulate_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, block_rows: int = 4096) -> torch.Tensor:
    """``out += a @ b`` in place, with ``out`` in its own dtype (e.g. an fp32 gradient of fp32 master weights)
    and ``a``, ``b`` in the compute dtype (bf16 under autocast).

    Same dtype: one ``addmm_``. Mixed: ``block_rows`` rows of ``out`` at a time, each product formed in fp32
    (:func:`mm_fp32`) and added, so the temporary is at most ``block_rows × out.shape[1]`` (never a second
    copy of a ``[V, d]`` gradient). Returns ``out``."""
    if out.dtype == a.dtype:
        return out.addmm_(a, b)
    for r0 in range(0, out.shape[0], block_rows):
        r1 = min(out.shape[0], r0 + block_rows)
        out[r0:r1].add_(mm_fp32(a[r0:r1], b))
    return out


def project_u(delta: torch.Tensor, projection: Projection, *, chunk_tokens: int = 4096) -> torch.Tensor:
    """``u = δ P1ᵀ`` in fp32 for ``delta [..., V]`` (the gradient of the loss w.r.t. the logits).

    bf16/fp16 ``delta`` is multiplied as it is (no fp32 copy of δ): the operand is the exact ±1 sign
    matrix of a Rademacher ``P1`` in δ's dtype (scaled by ``1/sqrt(k1)`` afterwards, in fp32), with fp32
    accumulation. fp32 ``delta`` uses fp32 operands. ``chunk_tokens`` rows are multiplied at a time, so
    no temporary larger than ``chunk_tokens × k1`` is created. Returns ``[..., k1]`` fp32.
    """
    if delta.shape[-1] != projection.V:
        raise ValueError(f"logit gradient has vocab size {delta.shape[-1]} but P1 is {tuple(projection.P1.shape)} "
                         "(P1 must be [k1, V] with the LM head's output size V)")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    with no_autocast(delta.device):
        return _project_u(delta, projection, chunk_tokens)


def _project_u(delta: torch.Tensor, projection: Projection, chunk_tokens: int) -> torch.Tensor:
    lead = delta.shape[:-1]
    flat = delta.reshape(-1, delta.shape[-1])
    op_dtype = flat.dtype if flat.dtype in (torch.bfloat16, torch.float16) else torch.float32
    p1t, scale = projection.operand("P1", op_dtype, flat.device)
    u = torch.empty(flat.shape[0], projection.k1, device=flat.device, dtype=torch.float32)
    for s in range(0, flat.shape[0], chunk_tokens):
        u[s:s + chunk_tokens] = mm_fp32(flat[s:s + chunk_tokens].to(op_dtype), p1t)
    if scale != 1.0:
        u.mul_(scale)
    return u.reshape(*lead, projection.k1)


def project_w(a: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``w = a P2ᵀ`` in fp32 for the LM-head input ``a [..., d]``. Returns ``[..., k2]``."""
    if a.shape[-1] != projection.d:
        raise ValueError(f"LM-head input has size {a.shape[-1]} but P2 is {tuple(projection.P2.shape)} "
                         "(P2 must be [k2, d] with the LM head's input size d)")
    p2t, scale = projection.operand("P2", torch.float32, a.device)
    with no_autocast(a.device):
        w = a.float() @ p2t
    return w.mul_(scale) if scale != 1.0 else w


def make_projection(V: int, d: int, k1: int, k2: int, *, seed: int, kind: str = "rademacher",
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    k: int | None = None) -> Projection:
    """Draw a factored projection ``P1 [k1,V]``, ``P2 [k2,d]`` (and ``R [k, k1*k2]`` when ``k`` is given).

    Identical on every rank for the same arguments: draws happen on a CPU generator seeded with
    ``seed`` in the fixed order P1, P2, R. Scaled so that ``E‖P1 G P2ᵀ‖² = ‖G‖²`` (and
    ``E‖R x‖² = ‖x‖²``).
    """
    for name, val in (("V", V), ("d", d), ("k1", k1), ("k2", k2)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"make_projection: {name} must be a positive int, got {val!r}")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"make_projection: k must be a positive int or None, got {k!r}")
    if kind not in KINDS:
        raise ValueError(f"make_projection: kind must be one of {KINDS}, got {kind!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    P1 = _draw(gen, k1, V, kind).div_(math.sqrt(k1))
    P2 = _draw(gen, k2, d, kind).div_(math.sqrt(k2))
    R = _draw(gen, k, k1 * k2, kind).div_(math.sqrt(k)) if k is not None else None
    proj = Projection(P1, P2, R, kind, int(seed), exact_signs=kind == "rademacher")
    return proj.to(device=device, dtype=dtype)

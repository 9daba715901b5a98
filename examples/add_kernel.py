"""Add a Triton kernel the megamix way: ``row_scale`` (``out[i, :] = x[i, :] · s[i]``, the shape of DoGraph's
per-sample row weights), written in the anatomy every file in kernels/ follows:

    <op>_ref  →  @triton.jit kernel  →  launcher (owns every check)  →  torch.autograd.Function  →  API

then checked the two ways docs/contributing.md asks for: against its reference (here in the Triton interpreter,
fp32, when there is no GPU) and compiled ahead of time for sm_80 / sm_90 / sm_100 with ``triton.compile`` (no GPU
needed), its shared memory held to each target's limit.

    python examples/add_kernel.py            # interpreter (or GPU) check, then the three compiles
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if "--compile" not in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any @triton.jit: fp32 only in the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from megamix.kernels.launch_configs import SHARED_MEMORY_LIMITS  # noqa: E402
from megamix.kernels.testing import assert_close  # noqa: E402

BLOCK_D = 128      # columns per program step (a launch configuration: it enters the compile gate)
NUM_WARPS = 4


# ------------------------------------------------------------------------------------------- reference
def row_scale_ref(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x [N, D] · s [N, 1]`` in torch: the definition every other path is tested against."""
    return x * s[:, None].to(x.dtype)


# ------------------------------------------------------------------------------------------- kernel
@triton.jit
def _row_scale_kernel(x_ptr, s_ptr, out_ptr, D, stride_x, stride_o, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(s_ptr + row).to(tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        msk = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=msk, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (x * s).to(out_ptr.dtype.element_ty), mask=msk)


# ------------------------------------------------------------------------------------------- launcher
def row_scale_triton(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Launch :func:`_row_scale_kernel`; every check of the inputs lives here, so the kernel needs none."""
    if x.dim() != 2 or s.shape != (x.shape[0],):
        raise ValueError(f"row_scale needs x [N, D] and s [N], got {tuple(x.shape)} and {tuple(s.shape)}")
    if x.device != s.device:
        raise ValueError(f"x is on {x.device} but s is on {s.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():
        _row_scale_kernel[(x.shape[0],)](x, s.contiguous(), out, x.shape[1], x.stride(0), out.stride(0),
                                         BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


# ------------------------------------------------------------------------------------------- autograd
class _RowScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return row_scale_triton(x, s)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        return row_scale_triton(grad, s), (grad.float() * x.float()).sum(1).to(s.dtype)


# ------------------------------------------------------------------------------------------- API
def row_scale(x: torch.Tensor, s: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``x · s[:, None]``, differentiable in both; ``backend``: ``triton`` (GPU or interpreter), ``torch`` or
    ``auto`` (Triton on a GPU or under the interpreter, else torch)."""
    use_triton = backend == "triton" or (backend == "auto" and (x.is_cuda or os.environ.get("TRITON_INTERPRET")))
    return _RowScale.apply(x, s) if use_triton else row_scale_ref(x, s)


# ------------------------------------------------------------------------------------------- checks
def check_against_reference() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 300, generator=g).to(dev).requires_grad_()     # D not a multiple of BLOCK_D: the mask
    s = torch.rand(7, generator=g).to(dev).requires_grad_()
    out = row_scale(x, s, backend="triton")
    (gx, gs) = torch.autograd.grad(out.square().sum(), (x, s))
    xr, sr = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = row_scale_ref(xr, sr)
    (rx, rs) = torch.autograd.grad(ref.square().sum(), (xr, sr))
    assert_close(out.detach(), ref.detach(), "grad", torch.float32, dev, "row_scale output")
    assert_close(gx, rx, "grad", torch.float32, dev, "d/dx")
    assert_close(gs, rs, "grad", torch.float32, dev, "d/ds")
    where = "gpu" if dev == "cuda" else "interpreter"
    print(f"{where}: matches row_scale_ref (output and both gradients, fp32)")


def compile_for_targets() -> None:
    """Compile the kernel as its first launch on each GPU would, without a GPU, and check its shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"x_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*fp32", "D": "i32", "stride_x": "i32",
                 "stride_o": "i32", "BLOCK_D": "constexpr"}
    for cap, limit in SHARED_MEMORY_LIMITS.items():
        k = triton.compile(ASTSource(fn=_row_scale_kernel, signature=signature, constexprs={"BLOCK_D": BLOCK_D}),
                           target=GPUTarget("cuda", cap, 32), options={"num_warps": NUM_WARPS})
        shared = int(k.metadata.shared)
        if shared > limit:
            raise SystemExit(f"sm_{cap}: {shared} B of shared memory is above the {limit} B limit")
        print(f"sm_{cap}: compiled, {shared} B shared memory (limit {limit} B)")


if __name__ == "__main__":
    if "--compile" in sys.argv:
        compile_for_targets()
    else:
        check_against_reference()
        # triton.compile cannot take the interpreter's kernels: compile in a process without TRITON_INTERPRET
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        sys.exit(subprocess.run([sys.executable, __file__, "--compile"], env=env).returncode)

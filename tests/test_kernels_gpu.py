"""GPU-only checks (compiled Triton, fp32 and bf16) at shapes closer to production. Skipped on CPU."""
import pytest
import torch

from megamix.kernels.domain_gram import per_sample_grads, per_sample_grads_ref
from megamix.kernels.fused_linear_ce import U_METHODS, fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from megamix.kernels.proj_u import proj_u_ref, proj_u_triton
from megamix.kernels.projection import make_projection
from megamix.kernels.testing import assert_close

pytestmark = pytest.mark.gpu
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _data(N, d, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    W = torch.randn(V, d, generator=g) / d ** 0.5 * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[::17] = -100
    return h.cuda().to(dtype), W.cuda().to(dtype), y.cuda()


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("N,d,V,k1,k2,chunk", [(1000, 256, 5003, 64, 32, 384), (777, 384, 32000, 128, 64, 4096)])
def test_gpu_triton_matches_reference(dt, N, d, V, k1, k2, chunk):
    dtype = DT[dt]
    h, W, y = _data(N, d, V, dtype)
    P = make_projection(V, d, k1, k2, seed=1, device="cuda")
    hr, Wr = h.float().clone().requires_grad_(), W.float().clone().requires_grad_()
    ref = fused_linear_cross_entropy_ref(hr, Wr, y, projection=P)
    ref.loss.backward()
    for backend in ("triton", "torch"):
        h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = fused_linear_cross_entropy(h1, W1, y, projection=P, chunk_tokens=chunk, backend=backend)
        out.loss.backward()
        tag = f"{backend}/{dt}"
        assert_close(out.loss, ref.loss, "loss", dtype, "cuda", f"{tag} loss")
        assert_close(out.token_loss, ref.token_loss, "loss", dtype, "cuda", f"{tag} token_loss")
        assert_close(h1.grad.float(), hr.grad, "grad", dtype, "cuda", f"{tag} dX")
        assert_close(W1.grad.float(), Wr.grad, "grad", dtype, "cuda", f"{tag} dW")
        assert_close(out.u, ref.u, "proj", dtype, "cuda", f"{tag} u")
        assert_close(out.w, ref.w, "proj", dtype, "cuda", f"{tag} w")


@pytest.mark.parametrize("dt,k1", [("fp32", 64), ("bf16", 64), ("bf16", 128)])
def test_gpu_grads_identical_with_projection_on_off(dt, k1):
    h, W, y = _data(2048, 512, 8192, DT[dt], seed=2)
    res = []
    for proj in (None, make_projection(8192, 512, k1, 64, seed=3, device="cuda")):
        h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = fused_linear_cross_entropy(h1, W1, y, projection=proj, chunk_tokens=1024, backend="triton")
        out.loss.backward()
        res.append((out.loss.detach(), h1.grad, W1.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_gpu_segment_reduction_and_sum_identity():
    B, T, d, V = 8, 256, 256, 4099
    h, W, y = _data(B * T, d, V, torch.float32, seed=4)
    P = make_projection(V, d, 64, 64, seed=5, device="cuda")
    W1 = W.clone().requires_grad_()
    out = fused_linear_cross_entropy(h, W1, y, projection=P, chunk_tokens=300, backend="triton")
    out.loss.backward()
    si = torch.arange(B, device="cuda").repeat_interleave(T)
    g = per_sample_grads(out.u, out.w, si, B, backend="triton")
    assert_close(g, per_sample_grads_ref(out.u, out.w, si, B), "proj", torch.float32, "cuda", "g_i")
    assert_close(g.sum(0), P.project_dense(W1.grad), "proj", torch.float32, "cuda", "Σ g_i = P1 dW P2ᵀ")


@pytest.mark.parametrize("u_method", U_METHODS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_gpu_u_methods(u_method, dt):
    """Each u_method on compiled Triton: u within the table; loss, dW bit-identical to the projection-off
    run; dX bit-identical except under ``augmented`` (reported when it differs, and within the table)."""
    dtype = DT[dt]
    h, W, y = _data(3000, 512, 50257, dtype, seed=6)
    P = make_projection(50257, 512, 64, 64, seed=7, device="cuda")
    ref = fused_linear_cross_entropy_ref(h.float(), W.float(), y, projection=P)
    res = []
    for proj in (None, P):
        h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = fused_linear_cross_entropy(h1, W1, y, projection=proj, chunk_tokens=1024, backend="triton",
                                         u_method=u_method)
        out.loss.backward()
        res.append((out, h1.grad, W1.grad))
    (off, dx0, dw0), (on, dx1, dw1) = res
    assert_close(on.u, ref.u, "proj", dtype, "cuda", f"{u_method}/{dt} u")
    assert torch.equal(on.loss, off.loss) and torch.equal(dw1, dw0)
    if u_method == "augmented":
        if not torch.equal(dx1, dx0):
            print(f"augmented/{dt}: dX differs from the projection-off dX by at most "
                  f"{(dx1.float() - dx0.float()).abs().max().item():.3e}")
        assert_close(dx1.float(), dx0.float(), "grad", dtype, "cuda", f"augmented/{dt} dX")
    else:
        assert torch.equal(dx1, dx0)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_gpu_proj_u_tiled_kernel(dt):
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(4096, 32000, generator=g) * 1e-3).cuda().to(DT[dt])
    p1t = torch.randint(0, 2, (32000, 64), generator=g).float().mul(2).sub(1).cuda().to(DT[dt])
    u = proj_u_triton(delta, p1t, 0.125)
    assert_close(u, proj_u_ref(delta, p1t, 0.125), "proj", DT[dt], "cuda", f"tiled u {dt}")

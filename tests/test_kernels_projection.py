"""make_projection: determinism, scaling, second stage, errors; Gram unbiasedness over seeds."""
import math

import pytest
import torch

from megamix.kernels.projection import make_projection
from megamix.kernels.testing import MC_SIGMAS


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_deterministic_and_scaled(kind):
    a = make_projection(37, 11, 5, 3, seed=7, kind=kind, k=6)
    b = make_projection(37, 11, 5, 3, seed=7, kind=kind, k=6)
    c = make_projection(37, 11, 5, 3, seed=8, kind=kind, k=6)
    assert a.P1.shape == (5, 37) and a.P2.shape == (3, 11) and a.R.shape == (6, 15)
    assert torch.equal(a.P1, b.P1) and torch.equal(a.P2, b.P2) and torch.equal(a.R, b.R)
    assert not torch.equal(a.P1, c.P1)
    if kind == "rademacher":
        assert torch.allclose(a.P1.abs(), torch.full_like(a.P1, 1 / math.sqrt(5)))
        assert torch.allclose(a.P2.abs(), torch.full_like(a.P2, 1 / math.sqrt(3)))
    # signs operand is exact and rescales back to P1ᵀ
    m, s = a.operand("P1", torch.bfloat16, torch.device("cpu"))
    assert m.shape == (37, 5) and torch.allclose(m.float() * s, a.P1.t(), atol=1e-6) if kind == "rademacher" \
        else m.shape == (37, 5)
    assert a.finalize(torch.ones(2, 15)).shape == (2, 6)
    assert a.k == 6 and make_projection(37, 11, 5, 3, seed=7).k == 15


def test_projection_norm_preserved_in_expectation():
    torch.manual_seed(0)
    G = torch.randn(40, 24, dtype=torch.float64)
    vals = torch.stack([make_projection(40, 24, 4, 3, seed=s, dtype=torch.float64).project_dense(G).pow(2).sum()
                        for s in range(600)])
    exact = G.pow(2).sum()
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean() - exact) < MC_SIGMAS * se, (vals.mean(), exact, se)


def test_gram_unbiased_over_seeds():
    """E[<P1 G_i P2ᵀ, P1 G_j P2ᵀ>] = <G_i, G_j> (Frobenius): Monte Carlo over 800 seeds, each entry
    within MC_SIGMAS standard errors of the exact Gram."""
    torch.manual_seed(1)
    V, d, B = 30, 16, 4
    base = torch.randn(V, d, dtype=torch.float64)
    G = torch.stack([base * 0.5 + torch.randn(V, d, dtype=torch.float64) for _ in range(B)])  # correlated
    exact = torch.einsum("ivd,jvd->ij", G, G)
    ests = []
    for s in range(800):
        g = make_projection(V, d, 6, 4, seed=1000 + s, dtype=torch.float64).project_dense(G)
        ests.append(g @ g.t())
    ests = torch.stack(ests)
    mean, se = ests.mean(0), ests.std(0) / math.sqrt(ests.shape[0])
    z = ((mean - exact).abs() / se).max()
    assert z < MC_SIGMAS, f"max |bias| = {z:.2f} standard errors"
    # and the estimator is not trivially exact (a test that could not fail would be useless)
    assert (ests.std(0) > 0).all()


@pytest.mark.parametrize("bad", [dict(V=0), dict(k1=-1), dict(kind="sparse"), dict(k=0)])
def test_projection_rejects_bad_input(bad):
    args = dict(V=10, d=4, k1=2, k2=2, kind="rademacher", k=None)
    args.update(bad)
    with pytest.raises(ValueError):
        make_projection(args["V"], args["d"], args["k1"], args["k2"], seed=0, kind=args["kind"], k=args["k"])


def test_second_stage_preserves_norm_in_expectation():
    x = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vals = torch.stack([make_projection(4, 4, 4, 3, seed=s, k=5, dtype=torch.float64).finalize(x).pow(2).sum(1)
                        for s in range(500)])
    se = vals.std(0) / math.sqrt(vals.shape[0])
    assert ((vals.mean(0) - x.pow(2).sum(1)).abs() < MC_SIGMAS * se).all()
    with pytest.raises(ValueError):
        make_projection(4, 4, 4, 3, seed=0, k=5).finalize(torch.zeros(2, 11))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_u_and_w_low_precision_operands(kind):
    """u = δ P1ᵀ over chunks: fp32 δ is exact to the reference; bf16/fp16 δ is multiplied without an fp32
    copy (bf16/fp16 operands, fp32 result) and stays within the bf16 tolerance."""
    from megamix.kernels.projection import project_u, project_w
    from megamix.kernels.testing import assert_close

    torch.manual_seed(0)
    proj = make_projection(300, 24, 16, 8, seed=3, kind=kind)
    delta = torch.randn(2, 37, 300) * 1e-3
    a = torch.randn(2, 37, 24)
    ref_u = delta.double() @ proj.P1.double().t()
    u = project_u(delta, proj, chunk_tokens=10)
    assert u.shape == (2, 37, 16) and u.dtype == torch.float32
    assert_close(u, ref_u, "proj", torch.float32, "cpu", "u fp32")
    for dt in (torch.bfloat16, torch.float16):
        u_lp = project_u(delta.to(dt), proj, chunk_tokens=10)
        assert u_lp.dtype == torch.float32
        assert_close(u_lp, delta.to(dt).double() @ proj.P1.double().t(), "proj", torch.bfloat16, "cpu", f"u {dt}")
    w = project_w(a, proj)
    assert_close(w, a.double() @ proj.P2.double().t(), "proj", torch.float32, "cpu", "w")
    with pytest.raises(ValueError, match="vocab size"):
        project_u(torch.zeros(3, 299), proj)
    with pytest.raises(ValueError, match="chunk_tokens"):
        project_u(delta, proj, chunk_tokens=0)

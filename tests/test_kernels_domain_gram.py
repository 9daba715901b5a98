"""Segmented per-sample reduction and per-domain sums / Gram / counts (torch and Triton interpreter)."""
import pytest
import torch

from megamix.kernels.domain_gram import (domain_stats, domain_stats_ref, fused_domain_stats, per_sample_grads,
                                 per_sample_grads_ref)
from megamix.kernels.testing import assert_close

# On a GPU machine the same tests run on CUDA (real Triton); on CPU under the interpreter.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = torch.float32
BACKENDS = ["torch", "triton"]


def _uw(N, k1, k2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, k1, generator=g).to(DEV), torch.randn(N, k2, generator=g).to(DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,k1,k2,B", [(83, 19, 7, 6), (150, 32, 16, 3)])
def test_per_sample_grads_match_reference(backend, N, k1, k2, B):
    u, w = _uw(N, k1, k2)
    si = torch.randint(0, B, (N,), generator=torch.Generator().manual_seed(1))
    si[::11] = -1  # skipped tokens (padding)
    g = per_sample_grads(u, w, si, B, backend=backend)
    assert g.shape == (B, k1 * k2)
    assert_close(g, per_sample_grads_ref(u, w, si, B), "proj", F32, DEV, "g")


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_and_empty_samples(backend):
    u, w = _uw(50, 10, 6, seed=2)
    offsets = torch.tensor([0, 0, 13, 13, 50])      # samples 0 and 2 are empty
    g = per_sample_grads(u, w, offsets=offsets, backend=backend)
    si = torch.repeat_interleave(torch.arange(4), offsets.diff())
    assert_close(g, per_sample_grads_ref(u, w, si, 4), "proj", F32, DEV, "g offsets")
    assert torch.all(g[0] == 0) and torch.all(g[2] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_domain_stats_and_fused_path_with_empty_domain(backend):
    N, B, D = 90, 7, 5
    u, w = _uw(N, 12, 9, seed=3)
    si = torch.randint(0, B, (N,), generator=torch.Generator().manual_seed(4))
    dom = torch.tensor([0, 3, 3, 1, 0, 3, 1])   # domains 2 and 4 are empty
    g = per_sample_grads(u, w, si, B, backend=backend)
    sums, gram, counts = domain_stats(g, dom, D)
    rs, rg, rc = domain_stats_ref(per_sample_grads_ref(u, w, si, B), dom, D)
    assert_close(sums, rs, "proj", F32, DEV, "sums")
    assert_close(gram, rg, "proj", F32, DEV, "gram")
    assert torch.equal(counts, rc) and counts.tolist() == [2, 2, 0, 3, 0]
    assert torch.all(sums[2] == 0) and torch.all(gram[4] == 0)
    fs, fg, fc = fused_domain_stats(u, w, si, dom, D, backend=backend)
    assert_close(fs, rs, "proj", F32, DEV, "fused sums")
    assert_close(fg, rg, "proj", F32, DEV, "fused gram")
    assert torch.equal(fc, rc)


def test_domain_gram_rejects_bad_input():
    u, w = _uw(10, 4, 3)
    with pytest.raises(ValueError):
        per_sample_grads(u, w[:5], torch.zeros(10, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        per_sample_grads(u, w, torch.full((10,), 3), 2)          # index beyond num_samples
    with pytest.raises(ValueError):
        per_sample_grads(u, w)                                    # neither index nor offsets
    with pytest.raises(ValueError):
        per_sample_grads(u, w, offsets=torch.tensor([0, 5, 3]))   # decreasing offsets
    with pytest.raises(ValueError):
        domain_stats(torch.zeros(3, 4), torch.tensor([0, 1, 2]), 2)  # domain id out of range

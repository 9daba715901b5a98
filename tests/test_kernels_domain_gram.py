"""Segmented per-sample reduction (torch and Triton interpreter)."""
import pytest
import torch

from megamix.kernels.domain_gram import per_sample_grads, per_sample_grads_ref
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


def test_per_sample_grads_rejects_bad_input():
    u, w = _uw(10, 4, 3)
    with pytest.raises(ValueError):
        per_sample_grads(u, w[:5], torch.zeros(10, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        per_sample_grads(u, w, torch.full((10,), 3), 2)          # index beyond num_samples
    with pytest.raises(ValueError):
        per_sample_grads(u, w)                                    # neither index nor offsets
    with pytest.raises(ValueError):
        per_sample_grads(u, w, offsets=torch.tensor([0, 5, 3]))   # decreasing offsets

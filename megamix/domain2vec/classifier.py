"""Meta-domain classifiers: text -> probability distribution over the n meta-domains.

The contract (:class:`MetaDomainClassifier`) is small so that other implementations, such as a
fine-tuned transformer as in the paper (Qwen2-1.5B there), can be plugged in:

- ``n_classes``: the number of meta-domains n.
- ``predict_proba(texts, batch_size, progress) -> np.ndarray [len(texts), n]``: rows are
  non-negative and sum to 1; column j is meta-domain j of the vocabulary. Deterministic.
- ``save(path)`` / ``load(path)`` (classmethod): round-trip to a directory.

The default :class:`EmbeddingLogRegClassifier` is multinomial logistic regression (sklearn) on the
embeddings of a :mod:`megamix.embed` backend. :class:`TransformerClassifier` documents the interface
for a fine-tuned sequence classifier; no trained transformer ships with megamix.
"""
from __future__ import annotations

import json
import pickle
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from megamix.configbase import ConfigError
from megamix.data.errors import DataError
from megamix.domain2vec._threads import blas_threads
from megamix.embed import Embedder

__all__ = ["MetaDomainClassifier", "EmbeddingLogRegClassifier", "TransformerClassifier",
           "train_classifier", "load_classifier"]


class MetaDomainClassifier(ABC):
    """Maps texts to meta-domain probabilities. See the module docstring for the contract."""

    n_classes: int

    @abstractmethod
    def predict_proba(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """``[len(texts), n_classes]`` probabilities; rows sum to 1."""

    def predict(self, texts: list[str], **kw) -> np.ndarray:
        """Most probable meta-domain id per text."""
        return self.predict_proba(texts, **kw).argmax(axis=1)

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the classifier into directory ``path``."""


class EmbeddingLogRegClassifier(MetaDomainClassifier):
    """Logistic regression on sentence embeddings (the fast default).

    Args:
        embedder: the backend used both to train and to classify (must match the vocabulary's).
        embedder_spec: ``{"name", "max_tokens", "kwargs"}`` used to rebuild the embedder on load.
        n_classes: number of meta-domains.
        C: inverse L2 regularisation strength.
    """

    def __init__(self, embedder: Embedder, embedder_spec: dict, n_classes: int, C: float = 10.0,
                 max_iter: int = 500, seed: int = 0):
        if n_classes < 2:
            raise ConfigError(f"a meta-domain classifier needs >= 2 classes (got {n_classes}); rebuild the "
                              "vocabulary with more meta-domains (`megamix d2v vocab --k 2` or more)")
        self.embedder = embedder
        self.embedder_spec = dict(embedder_spec)
        self.n_classes = int(n_classes)
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.model = None
        self.report: dict = {}

    def fit_embeddings(self, emb: np.ndarray, labels: np.ndarray, holdout: float = 0.2) -> dict:
        """Fit on precomputed embeddings; returns ``{"train_acc", "heldout_acc", ...}``.

        A seeded ``holdout`` fraction is kept out to measure accuracy; the reported model is then
        refit on all data.
        """
        from sklearn.linear_model import LogisticRegression

        emb = np.asarray(emb, np.float32)
        labels = np.asarray(labels, np.int64)
        if len(emb) != len(labels):
            raise ValueError(f"{len(emb)} embeddings but {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise ValueError(f"labels must be in [0, {self.n_classes}); got range "
                             f"[{labels.min()}, {labels.max()}]")
        if len(np.unique(labels)) < 2:
            raise ValueError("training labels contain a single class; nothing to learn")
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(len(emb))
        n_ho = int(round(holdout * len(emb))) if 0 < holdout < 1 else 0
        ho, tr = perm[:n_ho], perm[n_ho:]
        rep: dict = {"n_train": int(len(tr)), "n_heldout": int(n_ho), "n_classes": self.n_classes,
                     "chance_acc": float(np.bincount(labels).max() / len(labels))}
        with blas_threads(1):
            if n_ho and len(np.unique(labels[tr])) >= 2:
                m = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(emb[tr], labels[tr])
                rep["train_acc"] = float((m.predict(emb[tr]) == labels[tr]).mean())
                rep["heldout_acc"] = float((m.predict(emb[ho]) == labels[ho]).mean())
            self.model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(emb, labels)
            rep["fit_all_acc"] = float((self.model.predict(emb) == labels).mean())
        self.report = rep
        return rep

    def proba_from_embeddings(self, emb: np.ndarray) -> np.ndarray:
        """Probabilities from precomputed embeddings, scattered to all ``n_classes`` columns."""
        if self.model is None:
            raise RuntimeError("classifier is not trained; call fit_embeddings first")
        with blas_threads(1):
            p = np.asarray(self.model.predict_proba(np.asarray(emb, np.float32)), dtype=np.float64)
        out = np.zeros((len(p), self.n_classes), dtype=np.float64)
        out[:, self.model.classes_.astype(int)] = p
        return out / out.sum(axis=1, keepdims=True)

    def predict_proba(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.n_classes))
        return self.proba_from_embeddings(self.embedder.encode(list(texts), batch_size=batch_size,
                                                               progress=progress))

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        with open(p / "classifier.pkl", "wb") as f:
            pickle.dump(self.model, f)
        (p / "classifier.json").write_text(json.dumps(
            {"kind": "embedding_logreg", "embedder": self.embedder_spec, "n_classes": self.n_classes,
             "C": self.C, "max_iter": self.max_iter, "seed": self.seed, "report": self.report},
            indent=2))

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> "EmbeddingLogRegClassifier":
        from megamix.domain2vec.vocab import embedder_from_spec

        p = Path(path)
        meta = json.loads((p / "classifier.json").read_text())
        emb = embedder or embedder_from_spec(meta["embedder"])
        obj = cls(emb, meta["embedder"], meta["n_classes"], C=meta["C"], max_iter=meta["max_iter"],
                  seed=meta["seed"])
        with open(p / "classifier.pkl", "rb") as f:
            obj.model = pickle.load(f)  # noqa: S301 - our own artifact
        obj.report = meta.get("report", {})
        return obj


class TransformerClassifier(MetaDomainClassifier):
    """Interface for a fine-tuned transformer meta-domain classifier (as in the paper).

    Subclasses implement :meth:`logits` (``[batch, n_classes]`` raw scores for a list of texts,
    truncated to the model's window) and ``save``/``load``. ``predict_proba`` applies a softmax in
    batches. Training is out of scope here: fine-tune any ``AutoModelForSequenceClassification`` on
    ``reference.npz`` labels (written by ``megamix d2v vocab``) and wrap it in a subclass.
    """

    def __init__(self, n_classes: int):
        self.n_classes = int(n_classes)

    @abstractmethod
    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw class scores ``[len(texts), n_classes]``."""

    def predict_proba(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.n_classes))
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="classify", unit="batch")
        for s in starts:
            z = np.asarray(self.logits(list(texts[s: s + batch_size])), dtype=np.float64)
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            out[s: s + len(z)] = e / e.sum(axis=1, keepdims=True)
        return out


def train_classifier(vocab_dir: str | Path, out_dir: str | Path | None = None, *, C: float = 10.0,
                     holdout: float = 0.2, seed: int = 0,
                     embedder: Embedder | None = None) -> EmbeddingLogRegClassifier:
    """Train the default classifier on ``reference.npz`` (embeddings + meta-domain labels) written by
    :func:`megamix.domain2vec.vocab.build_vocab`, report held-out accuracy and save it to ``out_dir``
    (default: ``vocab_dir``)."""
    from megamix.domain2vec.vocab import MetaDomainVocab, embedder_from_spec

    vocab = MetaDomainVocab.load(vocab_dir)
    ref = Path(vocab_dir) / "reference.npz"
    if not ref.is_file():
        raise FileNotFoundError(f"{ref} not found: run `megamix d2v vocab` first")
    z = np.load(ref)
    spec = vocab.meta.get("embedder", {"name": "minilm", "max_tokens": 256, "kwargs": {}})
    emb = embedder or embedder_from_spec(spec)
    if "key" in spec and emb.key != spec["key"]:
        raise ValueError(f"embedder {emb.key!r} differs from the vocabulary's {spec['key']!r}")
    clf = EmbeddingLogRegClassifier(emb, spec, vocab.n, C=C, seed=seed)
    clf.fit_embeddings(z["embeddings"], z["labels"], holdout=holdout)
    clf.save(out_dir or vocab_dir)
    return clf


def load_classifier(path: str | Path, embedder: Embedder | None = None) -> MetaDomainClassifier:
    """Load a classifier saved by ``save`` (currently: ``embedding_logreg``)."""
    p = Path(path)
    if not (p / "classifier.json").is_file():
        raise FileNotFoundError(f"{p}/classifier.json not found: run `megamix d2v classify` first")
    kind = json.loads((p / "classifier.json").read_text()).get("kind")
    if kind == "embedding_logreg":
        return EmbeddingLogRegClassifier.load(p, embedder=embedder)
    raise DataError(f"unknown classifier kind {kind!r} in {p}/classifier.json; rerun `megamix d2v classify`")

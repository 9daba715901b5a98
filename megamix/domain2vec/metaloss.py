"""Per-meta-domain validation losses measured on documents: the targets of Domain2Vec+RegMix (paper
eq. 6, "the validation loss on the i-th meta-domain").

**Validation documents.** ``megamix d2v vectorize`` samples N passages from every validation domain
and averages their classifier probabilities into ``V_valid`` (and ``v_valid = Σ_d w_d V_valid[d]``).
It also records *which* passages they were and their probability rows ``P [N, n]`` in a sidecar
``<vectors>.valid_docs.npz`` (:func:`save_valid_docs`), so the documents behind ``v_valid`` can be
located again in the corpus (:func:`load_valid_docs` checks they are unchanged).

**Scoring.** After a proxy is trained, :func:`score_documents` computes its mean token loss ``ℓ_i`` on
each document (the first ``seq_len + 1`` tokens of the passage: the proxy has no position embeddings
beyond its training window).

**Targets** (``mode``), with document weights ``a_i = w_d / N_d`` (the weight of the document's domain
in ``v_valid``, shared by its N_d documents)::

    L_j = Σ_i a_i W_ij ℓ_i / Σ_i a_i W_ij

- ``argmax`` (default): ``W_ij = 1[j = argmax_k P_ik]``. Meta-domain j's validation set is the set of
  documents the classifier assigns to it, as a meta-domain is a set of documents in the paper (a
  k-means cluster; the classifier is trained on hard cluster labels). A meta-domain that no validation
  document is assigned to has no measured loss (NaN); :class:`~megamix.domain2vec.regmix.D2VRegMix`
  fits no model for it and renormalises ``q`` over the meta-domains it has.
- ``proba``: ``W_ij = P_ij`` (each document counts towards every meta-domain by its probability).
  Every meta-domain gets a target and eq. 7 then holds exactly on the measured documents:
  ``Σ_j q_j L_j = Σ_d w_d · mean_{i∈d} ℓ_i`` with ``q = v_valid``. The price is that every target is a
  blend of all documents, so the targets are smoother and more alike.
- ``bayes`` (the earlier approach, kept for comparison): no document is scored; per-domain losses are
  spread over meta-domains with ``p(d | j) ∝ w_d V_valid[d, j]``
  (:func:`~megamix.domain2vec.regmix.domain_to_meta_losses`). Then ``Σ_j q_j L_j = Σ_d w_d L_d``
  exactly, i.e. it is RegMix on the domain losses written in meta-domain coordinates.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamix.data.errors import DataError
from megamix.domain2vec.corpus import iter_passages
from megamix.io import atomic_open

__all__ = ["META_TARGETS", "ValidDocs", "save_valid_docs", "load_valid_docs", "docs_fingerprint",
           "assignment", "meta_losses_from_docs", "tokenize_docs", "score_documents"]

META_TARGETS = ("argmax", "proba", "bayes")


@dataclass
class ValidDocs:
    """The validation documents behind ``V_valid``: ``domains`` (validation domains, ``V_valid`` row
    order), per document its domain (``domain_idx``), its index in that domain's passage stream
    (``passage_idx``), its classifier probabilities (``proba [N, n]``), its weight ``a_i`` (``weights``,
    summing to 1) and, once loaded from the corpus, its ``texts``."""

    domains: list[str]
    domain_idx: np.ndarray
    passage_idx: np.ndarray
    proba: np.ndarray
    weights: np.ndarray
    texts: list[str] | None = None
    sha256: str = ""

    def __len__(self) -> int:
        return int(len(self.domain_idx))


def doc_weights(domain_idx: np.ndarray, domain_weights: np.ndarray) -> np.ndarray:
    """``a_i = w_d(i) / N_d(i)``: each domain's weight shared equally by its documents."""
    domain_idx = np.asarray(domain_idx, np.int64)
    counts = np.bincount(domain_idx, minlength=len(domain_weights)).astype(np.float64)
    return np.asarray(domain_weights, np.float64)[domain_idx] / counts[domain_idx]


def docs_fingerprint(domains: list[str], domain_idx, passage_idx, texts: list[str]) -> str:
    """sha256 over (domain, passage index, text) of every document, in order."""
    h = hashlib.sha256()
    for d, p, t in zip(domain_idx, passage_idx, texts):
        h.update(f"{domains[int(d)]}\x01{int(p)}\x01".encode())
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def save_valid_docs(path: str | Path, domain_idx, passage_idx, proba) -> None:
    """Write the sidecar (atomic)."""
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, domain_idx=np.asarray(domain_idx, np.int32),
                            passage_idx=np.asarray(passage_idx, np.int64),
                            proba=np.asarray(proba, np.float64))


def load_valid_docs(vectors, data_dir: str | Path | None = None, *, with_texts: bool = True) -> ValidDocs:
    """The validation documents of ``vectors`` (a :class:`~megamix.domain2vec.vectorize.DomainVectors`).

    Texts are read from ``data_dir`` (default: the corpus recorded by ``d2v vectorize``) and checked
    against the recorded fingerprint, so a changed corpus is refused rather than silently mixed in.
    """
    va = vectors.raw.get("valid", {})
    info = va.get("docs")
    src = getattr(vectors, "path", None)
    if not info:
        raise DataError(f"{src or 'the vectors'} records no validation documents (written by an older "
                        "`megamix d2v vectorize`): rerun `megamix d2v vectorize` to score per-meta-domain losses")
    side = Path(info["file"])
    if not side.is_absolute() and src is not None:
        side = Path(src).parent / side
    if not side.is_file():
        raise FileNotFoundError(f"{side} (validation documents of {src}) not found: rerun `megamix d2v vectorize`")
    z = np.load(side)
    dom_idx, pas_idx, proba = z["domain_idx"].astype(np.int64), z["passage_idx"], z["proba"]
    domains = list(vectors.valid_domains)
    if proba.shape != (len(dom_idx), vectors.V_train.shape[1]) or len(pas_idx) != len(dom_idx):
        raise DataError(f"{side}: inconsistent shapes {dom_idx.shape}, {pas_idx.shape}, {proba.shape}; rerun "
                        "`megamix d2v vectorize`")
    docs = ValidDocs(domains, dom_idx, pas_idx, proba, doc_weights(dom_idx, vectors.valid_weights),
                     sha256=str(info.get("sha256", "")))
    if not with_texts:
        return docs
    corpus = vectors.raw.get("corpus", {})
    root = Path(data_dir) if data_dir is not None else Path(corpus.get("data_dir", "data"))
    max_chars = int(corpus.get("max_chars", 1024))
    texts: list[str] = [""] * len(dom_idx)
    for k, d in enumerate(domains):
        want = {int(p): i for i, p in enumerate(pas_idx) if dom_idx[i] == k}
        if not want:
            continue
        last = max(want)
        for ps in iter_passages(root, d, "valid", max_chars):
            if ps.index in want:
                texts[want[ps.index]] = ps.text
            if ps.index >= last:
                break
    fp = docs_fingerprint(domains, dom_idx, pas_idx, texts)
    if docs.sha256 and fp != docs.sha256:
        raise DataError(f"the validation passages under {root}/corpus differ from those `d2v vectorize` "
                        f"classified for {src}; the corpus changed: rerun `megamix d2v vectorize`")
    docs.texts = texts
    return docs


def assignment(proba: np.ndarray, mode: str = "argmax") -> np.ndarray:
    """``W [N, n]``: hard (``argmax``) or soft (``proba``) document-to-meta-domain assignment."""
    P = np.asarray(proba, np.float64)
    if mode == "argmax":
        W = np.zeros_like(P)
        W[np.arange(len(P)), P.argmax(axis=1)] = 1.0
        return W
    if mode == "proba":
        return P
    raise ValueError(f"meta-domain targets from documents are 'argmax' or 'proba' (got {mode!r})")


def meta_losses_from_docs(doc_loss: np.ndarray, proba: np.ndarray, weights: np.ndarray,
                          mode: str = "argmax") -> np.ndarray:
    """Per-meta-domain losses ``[M, n]`` from document losses ``[M, N]`` (see the module docstring);
    NaN for a meta-domain with no document (``argmax``)."""
    L = np.atleast_2d(np.asarray(doc_loss, np.float64))
    W = assignment(proba, mode) * np.asarray(weights, np.float64)[:, None]
    if L.shape[1] != W.shape[0]:
        raise ValueError(f"document losses have {L.shape[1]} documents but there are {W.shape[0]}")
    if not np.all(np.isfinite(L)):
        raise ValueError("document losses must be finite")
    col = W.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(col > 0, (L @ W) / np.where(col > 0, col, 1.0), np.nan)


def tokenize_docs(texts: list[str], max_tokens: int) -> list[np.ndarray]:
    """GPT-2 token ids of each text (the token store's tokenizer), cut to ``max_tokens + 1`` tokens
    (``max_tokens`` predicted targets)."""
    from megamix.data.tokenizer import get_tokenizer

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    ids = get_tokenizer()(list(texts))["input_ids"]
    out = [np.asarray(t[: max_tokens + 1], np.int64) for t in ids]
    short = [i for i, t in enumerate(out) if len(t) < 2]
    if short:
        raise ValueError(f"{len(short)} validation documents have fewer than 2 tokens (first: #{short[0]})")
    return out


def score_documents(model, tokens: list[np.ndarray], *, batch_size: int = 16, device=None,
                    pad_id: int = 0) -> np.ndarray:
    """Mean next-token loss of ``model`` (a causal LM returning ``.logits``) on each token sequence.

    Sequences are batched by length and right-padded (padded labels are ignored, so padding never
    changes a document's loss); positions start at 0 for every document."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.full(len(tokens), np.nan)
    order = np.argsort([len(t) for t in tokens], kind="stable")
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s: s + batch_size]
                T = max(len(tokens[i]) for i in idx) - 1
                inp = torch.full((len(idx), T), pad_id, dtype=torch.long)
                lab = torch.full((len(idx), T), -100, dtype=torch.long)
                for r, i in enumerate(idx):
                    t = torch.as_tensor(tokens[i])
                    inp[r, : len(t) - 1] = t[:-1]
                    lab[r, : len(t) - 1] = t[1:]
                pos = torch.arange(T).expand(len(idx), T)
                logits = model(input_ids=inp.to(dev), position_ids=pos.to(dev), use_cache=False).logits
                ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), lab.to(dev).reshape(-1),
                                     ignore_index=-100, reduction="none").reshape(lab.shape)
                n = (lab != -100).sum(dim=1).to(ce.device)
                out[idx] = (ce.sum(dim=1) / n).double().cpu().numpy()
    finally:
        model.train(was_training)
    return out

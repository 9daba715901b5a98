"""Dataset vectoriser: a dataset's domain vector is the mean meta-domain distribution of N sampled
passages (Domain2Vec eq. 3). ``V_train`` stacks the training domains' vectors as **rows**:
``V_train[i]`` is domain i's vector, so the meta-domain distribution of mixture ``r`` is ``r @ V_train``.

``vectors.json`` (written by :func:`vectorize_corpus`)::

    {"domains": [..], "meta_domains": [..names..], "V_train": [[..] per domain],
     "valid": {"domains": [..], "V_valid": [[..] per valid domain], "weights": [..],
               "v_valid": [..],       # v_valid = weights @ V_valid
               "docs": {"file": "<stem>.valid_docs.npz", "n": N_docs, "sha256": ..}},
     "train_tokens": {domain: tokens}, "n_samples": N, "seed": s, "sample_counts": {domain: n},
     "corpus": {"data_dir": .., "max_chars": .., "sha256": {domain: {"train": .., "valid": ..}}}}

``valid.docs`` names the sidecar with the validation passages behind ``V_valid`` (their domain, their
index in the domain's passage stream, their classifier probabilities; see
:mod:`megamix.domain2vec.metaloss`), which Domain2Vec+RegMix scores proxies on. ``corpus.sha256``
fingerprints the jsonl files the vectors were computed from.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from megamix.data.corpus import corpus_domains
from megamix.data.errors import DataError
from megamix.domain2vec.classifier import MetaDomainClassifier
from megamix.domain2vec.corpus import Passage, domain_file, iter_passages, sample_passages
from megamix.domain2vec.metaloss import docs_fingerprint, save_valid_docs
from megamix.io import atomic_write_json
from megamix.simplex import normalize

__all__ = ["domain_vector", "vectorize_corpus", "load_vectors", "DomainVectors", "valid_docs_path"]


def domain_vector(classifier: MetaDomainClassifier, passages: list[Passage] | list[str],
                  batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Average of the classifier's probabilities over ``passages`` (texts or :class:`Passage`)."""
    texts = [p.text if isinstance(p, Passage) else p for p in passages]
    if not texts:
        raise ValueError("cannot vectorise an empty dataset (0 documents)")
    p = classifier.predict_proba(texts, batch_size=batch_size, progress=progress)
    return _mean_vector(p)


def _mean_vector(p: np.ndarray) -> np.ndarray:
    v = p.mean(axis=0)
    return v / v.sum()


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def valid_docs_path(vectors_path: str | Path) -> Path:
    """``<dir>/<stem>.valid_docs.npz`` next to ``vectors.json``."""
    p = Path(vectors_path)
    return p.with_name(p.stem + ".valid_docs.npz")


class DomainVectors:
    """Loaded ``vectors.json``: ``domains``, ``V_train [m, n]``, ``valid_domains``, ``V_valid``,
    ``valid_weights``, ``v_valid [n]``, ``meta_names`` and ``train_tokens``."""

    def __init__(self, obj: dict, path: str | Path | None = None):
        self.raw = obj
        self.path = Path(path) if path is not None else None
        self.domains: list[str] = list(obj["domains"])
        self.V_train = np.asarray(obj["V_train"], dtype=np.float64)
        self.meta_names: list[str] = list(obj.get("meta_domains", []))
        va = obj.get("valid", {})
        self.valid_domains: list[str] = list(va.get("domains", []))
        self.V_valid = np.asarray(va.get("V_valid", np.zeros((0, self.V_train.shape[1]))), np.float64)
        self.valid_weights = np.asarray(va.get("weights", []), np.float64)
        self.v_valid = np.asarray(va["v_valid"], np.float64) if "v_valid" in va else None
        self.train_tokens: dict[str, float] = dict(obj.get("train_tokens", {}))
        if self.V_train.ndim != 2 or self.V_train.shape[0] != len(self.domains):
            raise DataError(f"{path or 'the vectors'}: V_train has shape {self.V_train.shape}, expected "
                            f"({len(self.domains)}, n); rerun `megamix d2v vectorize`")

    def tokens_array(self) -> np.ndarray | None:
        if not all(d in self.train_tokens for d in self.domains):
            return None
        return np.asarray([self.train_tokens[d] for d in self.domains], np.float64)


def load_vectors(path: str | Path) -> DomainVectors:
    p = Path(path)
    if p.is_dir():
        p = p / "vectors.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `megamix d2v vectorize` first")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, not JSON
        raise DataError(f"{p} is not valid JSON ({e}); pass the vectors.json written by `megamix d2v vectorize`, "
                        "or rerun it") from None
    if not (isinstance(obj, dict) and "domains" in obj and "V_train" in obj):
        raise DataError(f"{p} is not a vectors file (no 'domains' and 'V_train'); pass the vectors.json written by "
                        "`megamix d2v vectorize`, or rerun it")
    return DomainVectors(obj, path=p)


def vectorize_corpus(classifier: MetaDomainClassifier, data_dir: str | Path, out_path: str | Path | None,
                     *, domains: list[str] | None = None, valid_domains: list[str] | None = None,
                     valid_weights: dict[str, float] | None = None, n_samples: int = 1000,
                     seed: int = 0, max_chars: int = 1024, meta_names: list[str] | None = None,
                     train_tokens: dict[str, float] | None = None, progress: bool = True) -> dict:
    """Vectorise every training domain (train split) and the validation set (valid splits).

    The validation vector is ``v_valid = Σ_d w_d V_valid[d]`` with ``valid_weights`` (default
    uniform), which matches a validation objective that averages per-domain losses with the same
    weights. Sampling of each domain is seeded by ``(seed, domain index)``.
    """
    domains = domains or corpus_domains(data_dir, "train", required=True)
    if valid_domains is None:
        valid_domains = [d for d in corpus_domains(data_dir, "valid") if d in domains] or None
    rows, counts = [], {}
    it = list(enumerate(domains))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="vectorise train domains", unit="domain")
    for i, d in it:
        ps = sample_passages(iter_passages(data_dir, d, "train", max_chars), n_samples, seed * 7919 + i)
        if not ps:
            raise DataError(f"training domain {d!r} is empty (no passages in {domain_file(data_dir, d, 'train')}); "
                            "add documents or leave it out with --domains")
        rows.append(domain_vector(classifier, ps))
        counts[d] = len(ps)
    all_doms = list(dict.fromkeys(list(domains) + list(valid_domains or [])))
    obj: dict = {"domains": list(domains), "V_train": np.asarray(rows).tolist(),
                 "meta_domains": meta_names or [str(j) for j in range(len(rows[0]))],
                 "n_samples": n_samples, "seed": seed, "sample_counts": counts,
                 "train_tokens": train_tokens or {},
                 "corpus": {"data_dir": str(data_dir), "max_chars": max_chars,
                            "sha256": {d: {sp: _sha256(domain_file(data_dir, d, sp)) for sp in ("train", "valid")}
                                       for d in all_doms}}}
    if valid_domains:
        vrows, d_idx, p_idx, probs, texts = [], [], [], [], []
        vit = list(enumerate(valid_domains))
        if progress:
            from tqdm import tqdm
            vit = tqdm(vit, desc="vectorise validation domains", unit="domain")
        for i, d in vit:
            ps = sample_passages(iter_passages(data_dir, d, "valid", max_chars), n_samples,
                                 seed * 7919 + 100003 + i)
            if not ps:
                raise DataError(f"validation domain {d!r} is empty (no passages in "
                                f"{domain_file(data_dir, d, 'valid')}); add documents or leave it out with "
                                "--valid-domains")
            P = classifier.predict_proba([p.text for p in ps])
            vrows.append(_mean_vector(P))
            probs.append(P)
            d_idx += [i] * len(ps)
            p_idx += [p.index for p in ps]
            texts += [p.text for p in ps]
        try:
            w = normalize([(valid_weights or {}).get(d, 1.0) for d in valid_domains], names=valid_domains)
        except ValueError as e:
            raise ValueError(f"valid_weights: {e}") from None
        obj["valid"] = {"domains": list(valid_domains), "V_valid": np.asarray(vrows).tolist(),
                        "weights": w.tolist(), "v_valid": (w @ np.asarray(vrows)).tolist()}
        if out_path is not None:
            side = valid_docs_path(out_path)
            save_valid_docs(side, d_idx, p_idx, np.concatenate(probs))
            obj["valid"]["docs"] = {"file": side.name, "n": len(d_idx),
                                    "sha256": docs_fingerprint(list(valid_domains), d_idx, p_idx, texts)}
    if out_path is not None:
        atomic_write_json(Path(out_path), obj)
    return obj

"""A synthetic token store for loader tests and benchmarks: exact sizes, built in milliseconds.

Documents have random lengths and random token ids below ``vocab_size - 1``, and each ends with
EOS, exactly like megamix's real store (``megamix.data.tokenize``). The layout and manifest follow
docs/interfaces.md, so :class:`megamix.data.store.TokenStore` opens it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from megamix.data.token_store import IndexedTokenWriter

EOS_ID = 50256
VOCAB = 50257


def build_synthetic_store(root: str | Path, domain_tokens: Mapping[str, int], *, valid_tokens: int = 0,
                          mean_doc_len: int = 200, seed: int = 0) -> Path:
    """Write ``root/tokens`` with about ``domain_tokens[name]`` train tokens per domain.

    Each split gets exactly the requested number of tokens (the last document is cut to fit and
    still ends with EOS). Returns the ``tokens`` directory.
    """
    rng = np.random.default_rng(seed)
    tokens_dir = Path(root) / "tokens"
    manifest = {"tokenizer": "synthetic", "vocab_size": VOCAB, "eos_id": EOS_ID, "domains": {}}
    for name, n_train in domain_tokens.items():
        entry = {}
        for split, n in (("train", int(n_train)), ("valid", int(valid_tokens))):
            docs = 0
            with IndexedTokenWriter(tokens_dir / name / split, np.uint16) as w:
                left = n
                while left > 0:
                    ln = int(min(left, max(1, rng.geometric(1.0 / mean_doc_len))))
                    doc = rng.integers(0, EOS_ID, size=ln, dtype=np.int64)
                    doc[-1] = EOS_ID
                    w.add_document(doc)
                    left -= ln
                    docs += 1
            entry[f"{split}_tokens"], entry[f"{split}_docs"] = n, docs
        manifest["domains"][name] = entry
    tokens_dir.mkdir(parents=True, exist_ok=True)
    (tokens_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return tokens_dir

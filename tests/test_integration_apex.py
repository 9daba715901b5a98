"""apex detection: absent, an unrelated 'apex' package, and a fake NVIDIA-shaped apex (its FusedAdam is what
train.optimizer=apex_fused_adam builds)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from megamix.integrations import apex_compat


@pytest.fixture
def clean_apex(monkeypatch):
    for name in list(sys.modules):
        if name == "apex" or name.startswith("apex."):
            monkeypatch.delitem(sys.modules, name)
    yield monkeypatch
    for name in list(sys.modules):
        if name == "apex" or name.startswith("apex."):
            sys.modules.pop(name, None)


def test_no_apex_is_an_error_not_a_fallback(clean_apex, tmp_path):
    clean_apex.setattr(sys, "path", [str(tmp_path)] + [p for p in sys.path if "apex" not in p])
    if apex_compat._module_available("apex"):
        pytest.skip("an apex package is installed in this environment")
    st = apex_compat.nvidia_apex_status()
    assert not st.usable and "not installed" in st.reason
    with pytest.raises(RuntimeError, match="not installed"):
        apex_compat.apex_fused_adam(nn.Linear(2, 2).parameters(), lr=1e-3)


def test_unrelated_apex_is_rejected(clean_apex, tmp_path):
    pkg = tmp_path / "apex"
    pkg.mkdir()
    # shaped like PyPI's Pyramid toolkit: a package with web helpers and no normalization/optimizers
    (pkg / "__init__.py").write_text("from . import views\n")
    (pkg / "views.py").write_text("def login(request):\n    return None\n")
    clean_apex.syspath_prepend(str(tmp_path))
    st = apex_compat.nvidia_apex_status(require_cuda=False)
    assert not st.usable and "not NVIDIA apex" in st.reason


def test_fake_nvidia_apex_detected_but_needs_cuda(clean_apex, tmp_path):
    pkg = tmp_path / "apex"
    (pkg / "normalization").mkdir(parents=True)
    (pkg / "optimizers").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "normalization" / "__init__.py").write_text(
        "import torch\nclass FusedLayerNorm(torch.nn.LayerNorm):\n    pass\n")
    (pkg / "optimizers" / "__init__.py").write_text(
        "import torch\nclass FusedAdam(torch.optim.AdamW):\n"
        "    def __init__(self, params, adam_w_mode=True, **kw):\n        super().__init__(params, **kw)\n")
    clean_apex.syspath_prepend(str(tmp_path))
    assert apex_compat.nvidia_apex_status(require_cuda=False).usable
    if not torch.cuda.is_available():
        st = apex_compat.nvidia_apex_status()
        assert not st.usable and "CUDA" in st.reason
        with pytest.raises(RuntimeError, match="no CUDA device"):
            apex_compat.apex_fused_adam(nn.Linear(2, 2).parameters(), lr=1e-3)
    clean_apex.setattr(apex_compat, "nvidia_apex_status",
                       lambda require_cuda=True: apex_compat.ApexStatus(True, "pretend"))
    opt = apex_compat.apex_fused_adam(nn.Linear(2, 2).parameters(), lr=1e-3, weight_decay=0.1)
    assert type(opt).__name__ == "FusedAdam" and opt.defaults["weight_decay"] == 0.1

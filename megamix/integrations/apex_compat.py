"""Optional NVIDIA apex: its FusedAdam (``train.optimizer=apex_fused_adam``), only when the real thing is installed.

PyPI's ``apex`` is an unrelated Pyramid web toolkit, so ``import apex`` succeeding proves nothing.
:func:`nvidia_apex_status` accepts apex only when ``apex.normalization`` and ``apex.optimizers`` import,
expose ``FusedLayerNorm`` and ``FusedAdam``, and (unless ``require_cuda=False``) CUDA is available
together with apex's compiled extensions. megamix uses apex only when asked (``train.optimizer=
apex_fused_adam``, built by :mod:`megamix.train.optim`), and then an unusable apex is an error that says
why. apex is never a dependency of megamix.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class ApexStatus:
    """Result of probing for NVIDIA apex."""

    usable: bool
    reason: str


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def nvidia_apex_status(require_cuda: bool = True) -> ApexStatus:
    """Probe for NVIDIA apex without side effects on failure.

    Args:
        require_cuda: also require a CUDA device and apex's compiled CUDA extensions
            (``fused_layer_norm_cuda`` and ``amp_C``); set False only for tests.
    """
    if not _module_available("apex"):
        return ApexStatus(False, "apex is not installed")
    try:
        norm = importlib.import_module("apex.normalization")
        opt = importlib.import_module("apex.optimizers")
    except Exception as e:  # an unrelated 'apex' (e.g. the Pyramid toolkit on PyPI) lands here
        return ApexStatus(False, f"'apex' is importable but is not NVIDIA apex ({type(e).__name__}: {e})")
    if not hasattr(norm, "FusedLayerNorm") or not hasattr(opt, "FusedAdam"):
        return ApexStatus(False, "'apex' lacks FusedLayerNorm/FusedAdam: not NVIDIA apex")
    if require_cuda:
        if not torch.cuda.is_available():
            return ApexStatus(False, "NVIDIA apex found but no CUDA device: its kernels need a GPU")
        missing = [m for m in ("fused_layer_norm_cuda", "amp_C") if not _module_available(m)]
        if missing:
            return ApexStatus(False, f"NVIDIA apex found without its CUDA extensions {missing} "
                                     "(built without --cuda_ext?)")
    return ApexStatus(True, "NVIDIA apex with CUDA extensions")


def has_nvidia_apex(require_cuda: bool = True) -> bool:
    """True when NVIDIA apex (with CUDA extensions, by default) is usable."""
    return nvidia_apex_status(require_cuda).usable


def apex_fused_adam(params: Iterable, *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """NVIDIA apex's ``FusedAdam`` in AdamW mode. Raises RuntimeError with :func:`nvidia_apex_status`'s
    reason when apex is not usable here (never falls back silently; the caller chooses another optimizer)."""
    status = nvidia_apex_status()
    if not status.usable:
        raise RuntimeError(status.reason)
    FusedAdam = importlib.import_module("apex.optimizers").FusedAdam
    return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)


__all__ = ["ApexStatus", "nvidia_apex_status", "has_nvidia_apex", "apex_fused_adam"]

"""Optional NVIDIA apex: use its fused kernels only when the real thing is installed.

PyPI's ``apex`` is an unrelated Pyramid web toolkit, so ``import apex`` succeeding proves nothing.
:func:`nvidia_apex_status` accepts apex only when ``apex.normalization`` and ``apex.optimizers`` import,
expose ``FusedLayerNorm`` and ``FusedAdam``, and (unless ``require_cuda=False``) CUDA is available
together with apex's compiled extensions. Everything else falls back to torch. apex is never a
dependency of megamix.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


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


def get_fused_adam(params: Iterable, *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8, weight_decay: float = 0.0, prefer_apex: bool = True
                   ) -> torch.optim.Optimizer:
    """apex ``FusedAdam`` (AdamW mode) when usable, else ``torch.optim.AdamW`` (fused on CUDA)."""
    if prefer_apex and has_nvidia_apex():
        FusedAdam = importlib.import_module("apex.optimizers").FusedAdam
        return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    params = list(params)
    fused = torch.cuda.is_available() and all(
        (p["params"][0] if isinstance(p, dict) else p).is_cuda for p in params[:1])
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=True if fused else None)


def get_layer_norm(normalized_shape: int | tuple[int, ...], *, eps: float = 1e-5,
                   prefer_apex: bool = True) -> nn.Module:
    """apex ``FusedLayerNorm`` when usable, else ``torch.nn.LayerNorm``."""
    if prefer_apex and has_nvidia_apex():
        FusedLayerNorm = importlib.import_module("apex.normalization").FusedLayerNorm
        return FusedLayerNorm(normalized_shape, eps=eps)
    return nn.LayerNorm(normalized_shape, eps=eps)


__all__ = ["ApexStatus", "nvidia_apex_status", "has_nvidia_apex", "get_fused_adam", "get_layer_norm"]

"""The optimizer of the training loop (``train.optimizer``).

- ``adamw``: ``torch.optim.AdamW`` (CPU or GPU);
- ``fused_adam``: DeepSpeed's ``FusedAdam`` (CUDA);
- ``apex_fused_adam``: NVIDIA apex's ``FusedAdam`` (CUDA, only the real apex: see
  :mod:`megamix.integrations.apex_compat`);
- ``auto``: AdamW, except on the DeepSpeed backend when the user's ``deepspeed.config`` has an
  ``optimizer`` section (DeepSpeed builds that one) or when optimizer states are offloaded (ZeRO-Offload
  runs DeepSpeed's CPU Adam only).

Every choice uses betas (0.9, 0.95), eps 1e-8 and weight decay ``train.weight_decay`` on matrices only
(biases, norms and position embeddings excluded). An optimizer this machine cannot run is a one-line
ConfigError, never a silent substitute.
"""
from __future__ import annotations

import importlib.util

import torch

from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.integrations import apex_compat
from megamix.integrations import deepspeed as ds_glue

#: what :func:`resolve_optimizer` returns besides the ``train.optimizer`` names
DS_CONFIG = "ds_config"        # DeepSpeed builds it from the user's ds_config optimizer section
DS_CPU_ADAM = "ds_cpu_adam"    # DeepSpeedCPUAdam, for ZeRO-Offload


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices, none on biases, norms and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_optimizer(cfg: MegamixConfig, *, cuda: bool | None = None) -> str:
    """The optimizer the run will use: ``adamw``, ``fused_adam``, ``apex_fused_adam``, ``ds_cpu_adam`` or
    ``ds_config``. Raises ConfigError when ``train.optimizer`` cannot run here or contradicts the ds_config."""
    choice = cfg.train.optimizer
    user = ds_glue.user_ds_config(cfg) if cfg.deepspeed.enabled else {}
    if "optimizer" in user:
        if choice != "auto":
            raise ConfigError(f"train.optimizer={choice} but deepspeed.config {cfg.deepspeed.config} has an optimizer "
                              "section, which DeepSpeed builds: set train.optimizer=auto, or remove the section")
        return DS_CONFIG
    offload = cfg.deepspeed.enabled and (cfg.deepspeed.offload_optimizer or ds_glue.offloads_optimizer(user))
    if offload:
        if choice != "auto":
            raise ConfigError(f"train.optimizer={choice} with ZeRO-Offload of the optimizer: DeepSpeed runs offloaded "
                              "optimizer states only with its own CPU Adam; set train.optimizer=auto")
        return DS_CPU_ADAM
    if choice == "auto":
        return "adamw"
    if choice in ("fused_adam", "apex_fused_adam"):
        cuda = (torch.cuda.is_available() and cfg.train.device != "cpu") if cuda is None else cuda
        if not cuda:
            raise ConfigError(f"train.optimizer={choice} is a CUDA kernel and this run has no GPU (train.device="
                              f"{cfg.train.device}, CUDA available: {torch.cuda.is_available()}); use "
                              "train.optimizer=adamw (or auto)")
        if choice == "fused_adam" and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.optimizer=fused_adam is DeepSpeed's FusedAdam; install deepspeed or use "
                              "train.optimizer=adamw")
        if choice == "apex_fused_adam":
            status = apex_compat.nvidia_apex_status()
            if not status.usable:
                raise ConfigError(f"train.optimizer=apex_fused_adam: {status.reason}; use train.optimizer=fused_adam "
                                  "or adamw")
    return choice


def build_optimizer(model: torch.nn.Module, cfg: MegamixConfig) -> torch.optim.Optimizer | None:
    """The optimizer of :func:`resolve_optimizer` over :func:`param_groups`, or None when DeepSpeed builds it
    from the user's ds_config (the DeepSpeed backend then passes the param groups to ``deepspeed.initialize``)."""
    kind = resolve_optimizer(cfg)
    if kind == DS_CONFIG:
        return None
    groups = param_groups(model, cfg.train.weight_decay)
    kw = {"lr": cfg.train.lr, "betas": ds_glue.ADAM_BETAS, "eps": ds_glue.ADAM_EPS}
    if kind == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if kind == "fused_adam":
        return ds_glue.fused_adam(groups, **kw)
    if kind == DS_CPU_ADAM:
        return ds_glue.cpu_adam(groups, **kw)
    return apex_compat.apex_fused_adam(groups, **kw)


__all__ = ["param_groups", "resolve_optimizer", "build_optimizer", "DS_CONFIG", "DS_CPU_ADAM"]

"""What a run returns (:class:`TrainResult`, also ``<out_dir>/result.json``) and what each step hands the callbacks
(:class:`StepOutput`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank (rank 0 also writes it to ``<out_dir>/result.json``)."""

    out_dir: str
    steps: int                       # the step the run stopped at
    start_step: int                  # the step it resumed from (0 for a fresh run)
    valid_loss: dict[str, float]
    valid_loss_avg: float
    train_loss: float
    weights: dict[str, float]
    tokens_per_second: float
    wall_seconds: float
    backend: str = "plain"           # plain | ddp | deepspeed
    world_size: int = 1
    lm_head_path: str = "fused"      # fused | capture | torch: how the LM-head loss and statistics ran
    peak_rss_mb: float = float("nan")        # this process's peak resident memory
    peak_device_mb: float = float("nan")     # peak CUDA memory allocated by torch (NaN on CPU)
    history: list[dict] = field(default_factory=list)          # evaluations: step, valid_loss
    weight_history: list = field(default_factory=list)         # (step, weights) of every change
    step_losses: list[float] = field(default_factory=list)     # mean train loss of each step run here
    step_seconds: list[float] = field(default_factory=list)
    plot: str | None = None


@dataclass
class StepOutput:
    """One optimizer step, as the callbacks see it."""

    step: int                        # steps completed (the 0-based step + 1)
    loss: float                      # mean train loss over ranks and micro-batches
    grad_norm: Any                   # the gradient norm (a float, or the engine's own value)
    skipped: bool                    # the non-finite guard skipped the update
    update: dict | None              # the Mixer's round (snapshot, weights, changed, log) on update steps
    stop: bool                       # a stop was requested on some rank


__all__ = ["TrainResult", "StepOutput"]

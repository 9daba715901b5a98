"""Optional Weights & Biases logging of a training run (``logging.wandb=true``; ``pip install megamix[wandb]``).

Rank 0's :class:`megamix.train.metrics.MetricsLogger` mirrors every record's scalars here under the same tags
as TensorBoard, with the run step as the x-axis (the W&B metric ``step``). The run config is the megamix
config. The W&B run id is kept in ``<out_dir>/wandb_run_id``, so a resumed training run continues the same
W&B run. ``wandb`` is imported only when a run is opened.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from megamix.configbase import ConfigError
from megamix.io import atomic_write_lines

RUN_ID_FILE = "wandb_run_id"


class WandbRun:
    """One W&B run for a training run directory.

    Args:
        out_dir: the training run's ``train.out_dir`` (W&B's files go to ``<out_dir>/wandb/``).
        settings: a :class:`megamix.config.LoggingConfig` (``wandb_project``, ``wandb_entity``,
            ``wandb_name``, ``wandb_mode``, ``wandb_tags``).
        config: the run's config as a dict.
        resume: the training run resumed from a checkpoint: continue the W&B run recorded in
            ``<out_dir>/wandb_run_id`` (a new one when there is none).
    """

    def __init__(self, out_dir: str | Path, settings: Any, config: dict, *, resume: bool = False):
        import wandb

        out = Path(out_dir)
        id_file = out / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(6)
        kwargs = dict(project=settings.wandb_project or None, entity=settings.wandb_entity or None,
                      name=settings.wandb_name or out.name, dir=str(out), config=config, id=run_id,
                      resume="allow", tags=list(settings.wandb_tags) or None)
        if settings.wandb_mode:
            kwargs["mode"] = settings.wandb_mode
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # no login / no network in online mode, a bad entity, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"logging.wandb=true but Weights & Biases could not start a run ({first}); run "
                              "`wandb login`, or set logging.wandb_mode=offline (upload later with `wandb sync`), "
                              "or logging.wandb=false") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        atomic_write_lines(id_file, [run_id])

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": int(step)})

    def finish(self) -> None:
        self.run.finish()


__all__ = ["WandbRun", "RUN_ID_FILE"]

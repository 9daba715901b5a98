"""Add a training backend: ``PlainBackend`` plus an exponential moving average (EMA) of the weights, saved in every
checkpoint and restored on resume, so an interrupted run's EMA equals an uninterrupted run's bit for bit.

The walkthrough in docs/contributing.md explains each hook. A backend decides how the model is run (devices,
precision, communication, the optimizer step) and what a checkpoint holds; the Trainer calls its hooks and never
looks inside. Pass one to ``train(cfg, backend=...)`` (or ``Trainer``).

    python examples/add_backend.py --data-dir data --out-dir runs/ema --steps 6 --stop-at 4
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megamix.io import atomic_path
from megamix.train.backend import PlainBackend

EMA_FILE = "ema.pt"


class EMABackend(PlainBackend):
    """One process, AdamW, and ``ema ← decay · ema + (1 − decay) · params`` after every applied step."""

    name = "plain"          # recorded in result.json; the checkpoint layout is PlainBackend's plus ema.pt

    def __init__(self, decay: float = 0.9, **kw):
        super().__init__(**kw)
        self.decay = decay

    def setup(self, model, optimizer, lr_at, cfg) -> None:
        super().setup(model, optimizer, lr_at, cfg)
        self.ema = [p.detach().clone() for p in self.model.parameters()]

    def optimizer_step(self, skip: bool = False):
        norm = super().optimizer_step(skip=skip)
        if not skip:        # a step the non-finite guard skipped leaves the EMA alone, as it leaves the weights
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1.0 - self.decay)
        return norm

    def save(self, ckpt_root, tag) -> None:
        super().save(ckpt_root, tag)
        with atomic_path(Path(ckpt_root) / tag / EMA_FILE) as tmp:      # a kill never leaves half a file
            torch.save(self.ema, tmp)

    def load(self, ckpt_root, tag, state=None) -> None:
        super().load(ckpt_root, tag, state)
        saved = torch.load(Path(ckpt_root) / tag / EMA_FILE, map_location=self.device)
        for e, s in zip(self.ema, saved):
            e.copy_(s)


def main(argv: list[str] | None = None) -> list[torch.Tensor]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="Folder holding tokens/ (built by `megamix data build`).")
    ap.add_argument("--out-dir", default="runs/ema")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stop-at", type=int, default=None, help="Stop (and checkpoint) after this many steps.")
    args = ap.parse_args(argv)

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.train.loop import train

    vocab = TokenStore(f"{args.data_dir}/tokens").vocab_size
    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", f"train.out_dir={args.out_dir}", f"train.steps={args.steps}",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32", f"model.vocab_size={vocab}",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0", "train.checkpoint_every=2",
        "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=2"]).validate()
    backend = EMABackend(decay=0.9)
    res = train(cfg, backend=backend, progress=False, log_to_stdout=False, stop_at_step=args.stop_at)
    print(f"steps {res.start_step}->{res.steps}; EMA norm {sum(float(e.norm()) for e in backend.ema):.6f}")
    return backend.ema


if __name__ == "__main__":
    main()

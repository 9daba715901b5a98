"""Add a mixing strategy: ``loss-tilt`` moves sampling weight towards the domains whose training loss is highest.

The walkthrough in docs/contributing.md explains each part. The strategy sees each round's all-reduced
statistics (a :class:`~megamix.snapshot.StatsSnapshot`) and the weights in force, and proposes new raw weights
with a mask of the domains it had data for; the base class applies the shared guards (inactive domains keep their
weight, EMA, floor, drift bound). Registering it makes ``mixing.strategy=loss-tilt`` work everywhere.

    python examples/add_strategy.py --data-dir data --out-dir runs/loss-tilt --steps 8
"""
from __future__ import annotations

import argparse

import numpy as np

from megamix.snapshot import StatsSnapshot
from megamix.strategies import register_strategy
from megamix.strategies.base import MixingStrategy


class LossTiltStrategy(MixingStrategy):
    """Weights ``∝ current · exp(tilt · (loss_d − mean loss))`` over the domains seen this round."""

    name = "loss-tilt"
    default_ema = 0.0           # the guards' defaults when mixing.ema / mixing.min_weight are null
    default_min_weight = 0.01
    tilt = 1.0

    def _raw_update(self, snap: StatsSnapshot, current: np.ndarray, info: dict):
        loss = np.asarray(snap.domain_loss, np.float64)
        active = self.count_mask(snap.counts) & np.isfinite(loss)
        if not active.any():
            info["fallback"] = "no domain has a finite training loss this round"
            return None                                     # keep the weights in force
        z = np.where(active, loss - loss[active].mean(), 0.0)
        info["domain_loss"] = loss.tolist()                 # lands in the run's mixing records
        return current * np.exp(self.tilt * z), active


register_strategy("loss-tilt", LossTiltStrategy, "weights tilted towards the domains with the highest train loss")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="Folder holding tokens/ (built by `megamix data build`).")
    ap.add_argument("--out-dir", default="runs/loss-tilt")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.train.loop import train

    vocab = TokenStore(f"{args.data_dir}/tokens").vocab_size
    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", f"train.out_dir={args.out_dir}", f"train.steps={args.steps}",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=32", f"model.vocab_size={vocab}",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0", "train.checkpoint_every=0",
        "projection.k1=8", "projection.k2=4", "mixing.strategy=loss-tilt", "mixing.update_every=2"]).validate()
    res = train(cfg, progress=False, log_to_stdout=False)
    for step, w in res.weight_history:
        print(f"step {step}: " + " ".join(f"{d}={x:.3f}" for d, x in zip(res.weights, w)))
    return res


if __name__ == "__main__":
    main()

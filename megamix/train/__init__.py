"""The one training loop (:func:`megamix.train.loop.train`) over execution backends (plain PyTorch,
torch DDP, DeepSpeed), with one checkpoint layout, one evaluation and one result type."""
from megamix.train.loop import TrainResult, train

__all__ = ["train", "TrainResult"]

"""Online weighted data loading: a deterministic, resumable mixture sampler and token-window loader.

See :mod:`megamix.loader.sampler` for the sampling semantics and :mod:`megamix.loader.loader`
for what a sample and a batch are.
"""
from megamix.loader.distributed import broadcast_weights, verify_consistent, weights_checksum
from megamix.loader.loader import Batch, DomainWindows, MixtureLoader, eval_batches
from megamix.loader.sampler import (DomainExhaustedError, GlobalBatch, MixtureSampler, WeightError,
                                    allocate, quantize_weights, validate_weights)
from megamix.loader.telemetry import MixtureTelemetry

__all__ = ["Batch", "DomainWindows", "MixtureLoader", "eval_batches", "MixtureSampler", "GlobalBatch",
           "DomainExhaustedError", "WeightError", "allocate", "quantize_weights", "validate_weights",
           "broadcast_weights", "verify_consistent", "weights_checksum", "MixtureTelemetry"]

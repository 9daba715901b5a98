"""Per-domain loader telemetry: realised share vs target weight, cumulative and over a recent window.

All counts are **global** (every rank's samples together; each rank computes the whole global
batch anyway), so the telemetry is identical on every rank and survives a resume with a different
world size. Because every sample has ``seq_len`` trained tokens, token shares equal sample shares.
"""
from __future__ import annotations

import numpy as np


class MixtureTelemetry:
    """Running per-domain counts of one sample stream.

    Args:
        domain_names: names, in loader order.
        window: number of recent steps for the "last window" shares.
        tokens_per_sample: trained tokens per sample (``seq_len``).
    """

    def __init__(self, domain_names: list[str], window: int = 100, tokens_per_sample: int = 1):
        if window < 1:
            raise ValueError(f"telemetry window must be >= 1, got {window}")
        self.domain_names = list(domain_names)
        self.window = int(window)
        self.tokens_per_sample = int(tokens_per_sample)
        D = len(self.domain_names)
        self._counts = np.zeros((self.window, D), dtype=np.int64)   # ring buffer: realised per step
        self._targets = np.zeros((self.window, D), dtype=np.float64)  # ring buffer: B * weights per step
        self._filled = 0
        self._pos = 0
        self.local_samples = np.zeros(D, dtype=np.int64)  # this rank only; not checkpointed

    def record(self, global_counts: np.ndarray, weights: np.ndarray, local_counts: np.ndarray | None = None) -> None:
        """Add one step: realised global per-domain counts and the weights that were in force."""
        B = int(global_counts.sum())
        self._counts[self._pos] = global_counts
        self._targets[self._pos] = B * np.asarray(weights, dtype=np.float64)
        self._pos = (self._pos + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        if local_counts is not None:
            self.local_samples += local_counts

    def report(self, *, step: int, weights: np.ndarray, counts: np.ndarray, cumulative_target: np.ndarray,
               epochs: np.ndarray, epochs_completed: np.ndarray) -> dict:
        """A JSON-friendly summary. ``counts``/``cumulative_target``/epochs come from the sampler."""
        total = max(int(counts.sum()), 1)
        wc = self._counts[:self._filled].sum(axis=0) if self._filled else np.zeros(len(self.domain_names))
        wt = self._targets[:self._filled].sum(axis=0) if self._filled else np.zeros(len(self.domain_names))
        wtot = max(float(wc.sum()), 1.0)
        per = {}
        for i, name in enumerate(self.domain_names):
            per[name] = {
                "target_weight": float(weights[i]),
                "target_share_cumulative": float(cumulative_target[i] / total),
                "realised_share_cumulative": float(counts[i] / total),
                "target_share_window": float(wt[i] / wtot),
                "realised_share_window": float(wc[i] / wtot),
                "samples_seen": int(counts[i]),
                "tokens_seen": int(counts[i]) * self.tokens_per_sample,
                "samples_seen_this_rank": int(self.local_samples[i]),
                "epoch": int(epochs[i]),
                "epochs_completed": float(epochs_completed[i]),
            }
        share_err = np.abs(counts / total - cumulative_target / total)
        return {"step": int(step), "window_steps": int(self._filled), "samples_seen": int(counts.sum()),
                "max_abs_share_error_cumulative": float(share_err.max()),
                "domains": per}

    def state_dict(self) -> dict:
        order = [(self._pos - self._filled + k) % self.window for k in range(self._filled)]
        return {"window": self.window, "counts": self._counts[order].tolist(),
                "targets": self._targets[order].tolist()}

    def load_state_dict(self, sd: dict) -> None:
        counts = np.asarray(sd["counts"], dtype=np.int64).reshape(-1, len(self.domain_names))
        targets = np.asarray(sd["targets"], dtype=np.float64).reshape(-1, len(self.domain_names))
        counts, targets = counts[-self.window:], targets[-self.window:]
        self._counts[:] = 0
        self._targets[:] = 0
        n = len(counts)
        self._counts[:n], self._targets[:n] = counts, targets
        self._filled, self._pos = n, n % self.window
        self.local_samples[:] = 0

"""The statistics a mixing strategy sees at each update: an all-reduced, numpy-only snapshot."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StatsSnapshot:
    """Per-domain gradient statistics accumulated over one round of K optimizer steps.

    All arrays are numpy and identical on every rank (they come from all-reduced accumulators).
    ``k`` is the projected gradient dimension (k1*k2, or the second-stage k).
    """

    step: int
    domain_names: list[str]
    counts: np.ndarray                      # [D] samples seen this round per domain
    sums: np.ndarray                        # [D, k] Σ g_i over this round's samples of each domain
    gram: np.ndarray                        # [D, D] sums @ sums.T
    domain_loss: np.ndarray                 # [D] mean train token loss this round (nan if unseen)
    per_sample: np.ndarray | None = None    # [n, k] projected per-sample gradients of this round
    per_sample_domain: np.ndarray | None = None  # [n] domain index of each row of per_sample
    eval_sums: np.ndarray | None = None     # [E, k] held-out gradient sums (optional)
    extra: dict = field(default_factory=dict)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def means(self) -> np.ndarray:
        """[D, k] mean projected gradient per domain (zero rows for unseen domains)."""
        c = np.maximum(self.counts.astype(np.float64), 1.0)[:, None]
        return self.sums / c

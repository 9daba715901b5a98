"""``MixtureSampler``: which (domain, sample) pairs make up each global batch, given online weights.

Semantics
---------
* **Sample.** Domain ``d`` has ``domain_sizes[d]`` samples (fixed windows of ``seq_len + 1``
  tokens of its packed token stream, see :mod:`megamix.loader.loader`). A **weight counts
  samples**; all samples have the same length, so it also counts tokens.
* **Weights.** ``weights`` is a length-D vector, ``>= 0``, finite, not all zero, and zero on every
  empty domain. It is normalised to sum 1 (:func:`megamix.simplex.normalize`) and quantised to
  integers ``q_d`` that sum to exactly ``Q = 2^32`` (``q_d > 0`` iff ``w_d > 0``). From here on all
  arithmetic is exact int64, so every rank, node and NumPy build computes bit-identical batches.
  ``set_weights(w)`` may be called at any step boundary; it takes effect for the next global batch
  and costs O(D): no permutation is rebuilt.
* **Per-step counts (block-deterministic, largest remainder with carry).** For global batch ``B``
  each domain has a carried residual ``e_d`` (units of 1/Q sample, initially 0). At each step the
  target is ``t_d = e_d + B*q_d``. Among domains with ``w_d > 0`` the ``B`` samples go to the B
  largest values of the multiset ``{t_d - k*Q : k >= 0}`` (ties: lower domain index first), i.e.
  ``floor(t_d/Q)`` each plus one for the largest remainders; this is the greedy "largest deficit"
  rule applied unit by unit. Then ``e_d <- t_d - c_d*Q``. Domains at weight 0 get nothing and keep
  their residual frozen (they are paid back if their weight becomes positive again).
* **Exactness bound.** With ``C_d(s)`` the samples of domain d in the first s steps and
  ``T_d(s) = sum_{t<s} B*q_d(t)/Q`` the cumulative target, ``C_d(s) = T_d(s) - e_d(s)`` holds
  exactly, and ``sum_d e_d = 0`` always. Proven bound: as long as no weight-0 domain is owed
  samples (``e_d <= 0`` for every domain at weight 0, e.g. the support never shrank), every unit
  is handed out at a positive deficit, so ``e_d > -1``, hence ``e_d < D - 1``:
  ``|C_d - T_d| < max(1, D - 1)`` samples at every step, however often the weights change.
  Measured (tests, random weights and histories): ``|e_d| < 1``. When a domain's weight drops
  to 0 while it is owed samples, the other domains' bound widens by that debt until it is paid.
* **Order.** Within a domain, samples are read in the order of a seeded per-(domain, epoch)
  permutation (a Feistel bijection, :mod:`megamix.loader.permutation`) through a cursor, so no
  sample repeats within a domain epoch and none is skipped, also across weight changes. When the
  cursor reaches the end of the domain, the epoch counter increases and a fresh permutation starts
  (``max_epochs`` caps this with :class:`DomainExhaustedError`). The B samples of a global batch are
  then shuffled by sorting a hash keyed by ``(seed, step)`` (:func:`~megamix.loader.permutation.hash_order`).
* **Ranks.** The global batch is computed in full (and identically) on every rank; rank ``r`` of
  ``W`` takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` of the shuffled batch, so ranks are
  disjoint and the union is the global batch. Weights must be identical on all ranks: megamix uses
  **rank 0 decides and broadcasts** (:func:`megamix.loader.distributed.broadcast_weights`), and
  :func:`megamix.loader.distributed.verify_consistent` checks the sampler state (a checksum
  all-reduce) in debug mode.
* **Checkpoints.** :meth:`MixtureSampler.state_dict` is global, not per rank: step, weights, weight
  history, cursors, epochs, residuals and counts. Loading it reproduces exactly the stream an
  uninterrupted run would produce, also with a different world size as long as the global batch
  size is unchanged (a different global batch size is refused with a clear error).

So the stream is a pure function of ``(seed, domain sizes, B, weight history, step)``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megamix.configbase import RunError
from megamix.loader.permutation import ROUNDS, PermutationCache, derive_key, feistel_many, hash_order
from megamix.simplex import normalize

Q_BITS = 32
Q = 1 << Q_BITS
_TAG_DOMAIN = 1
_TAG_BATCH = 2
STATE_FORMAT = "megamix.MixtureSampler"
STATE_VERSION = 1


class DomainExhaustedError(RunError):
    """A domain needed a sample after ``max_epochs`` full passes (``loader.max_epochs``). A
    :class:`~megamix.configbase.RunError` (so still a ``RuntimeError``): the CLI prints its one line, exit 2."""


class WeightError(ValueError):
    """Mixture weights are malformed (wrong length, negative, NaN/inf, all zero, or on an empty domain)."""


def validate_weights(weights, domain_sizes: Sequence[int], names: Sequence[str] | None = None) -> np.ndarray:
    """Check ``weights`` against the domains and return them normalised to sum 1 (float64).

    The vector checks and the normalisation are :func:`megamix.simplex.normalize` (correctly rounded
    sum, so identical on every platform; an already normalised vector keeps its exact bits); this adds
    the loader's own rule that an empty domain must have weight 0.

    Raises:
        WeightError: with a message naming the offending domain(s).
    """
    sizes = np.asarray(domain_sizes, dtype=np.int64)
    names = list(names) if names is not None else [f"domain {i}" for i in range(len(sizes))]
    try:
        w = normalize(weights, len(sizes), names)
    except ValueError as e:
        raise WeightError(str(e)) from None
    empty = [names[i] for i in np.flatnonzero((w > 0) & (sizes == 0))]
    if empty:
        raise WeightError(f"nonzero weight on empty domain(s) {empty}: they have no samples "
                          "(too few tokens for one window); give them weight 0")
    return w


def quantize_weights(w: np.ndarray) -> np.ndarray:
    """Integer weights ``q`` (int64) with ``sum(q) == 2^32`` and ``q_d > 0`` iff ``w_d > 0``.

    ``w`` must already be normalised. Largest remainder: floor, then +1 to the largest fractional
    parts (ties: lower index); a positive weight below 2^-32 is raised to one unit.
    """
    scaled = w * float(Q)
    q = np.floor(scaled).astype(np.int64)
    q[(w > 0) & (q == 0)] = 1
    diff = Q - int(q.sum())
    pos = np.flatnonzero(w > 0)
    if diff > 0:
        frac = scaled[pos] - np.floor(scaled[pos])
        order = np.lexsort((pos, -frac))
        q[pos[order[:diff]]] += 1
    while diff < 0:  # only after raising tiny weights: take from the largest
        order = np.lexsort((pos, -q[pos]))
        take = pos[order[:min(-diff, len(pos))]]
        take = take[q[take] > 1]
        q[take] -= 1
        diff += len(take)
    return q


def allocate(target: np.ndarray, active: np.ndarray, batch: int) -> np.ndarray:
    """Exact greedy ("largest deficit") allocation of ``batch`` samples.

    Args:
        target: int64 ``t_d`` in units of 1/Q sample.
        active: bool mask of domains that may receive samples.
        batch: number of samples to hand out.

    Returns:
        int64 counts ``c`` with ``c.sum() == batch`` and ``c == 0`` outside ``active``: the B
        largest values of ``{t_d - k*Q : k >= 0, d active}``, ties to the lower domain index.
    """
    if not active.any():
        raise WeightError("no domain has a positive weight")
    c = np.zeros(len(target), dtype=np.int64)
    pos = active & (target > 0)
    c[pos] = target[pos] // Q
    s = int(c.sum())
    if s < batch:  # hand out the remaining units to the largest remainders (one each)
        idx_active = np.flatnonzero(active)
        v = target[idx_active] - c[idx_active] * Q
        if batch - s > int((v >= 0).sum()):
            return _allocate_threshold(target, active, batch)  # rare: large negative deficits
        order = np.lexsort((idx_active, -v))
        c[idx_active[order[:batch - s]]] += 1
        s = batch
    while s > batch:  # only when some targets are negative: drop the smallest granted units
        idx = np.flatnonzero(c > 0)
        v = target[idx] - (c[idx] - 1) * Q
        order = np.lexsort((-idx, v))
        drop = idx[order[:s - batch]]
        c[drop] -= 1
        s -= len(drop)
    return c


def _allocate_threshold(target: np.ndarray, active: np.ndarray, batch: int) -> np.ndarray:
    """Exact top-``batch`` selection by bisection on the threshold value (general but slower)."""
    t = target[active]

    def above(theta: int) -> np.ndarray:  # units of each domain with value t - k*Q > theta
        return np.maximum(0, -((theta - t) // Q))

    lo, hi = int(t.min()) - (batch + 1) * Q, int(t.max())  # above(lo) > batch, above(hi) == 0
    while hi - lo > 1:  # smallest theta with sum(above(theta)) <= batch
        mid = (lo + hi) // 2
        if int(above(mid).sum()) <= batch:
            hi = mid
        else:
            lo = mid
    ca = above(hi)
    rest = batch - int(ca.sum())
    if rest:  # values exactly equal to the threshold: lower domain index first
        tie = np.flatnonzero(t - ca * Q == hi)[:rest]
        ca[tie] += 1
    c = np.zeros(len(target), dtype=np.int64)
    c[active] = ca
    return c


@dataclass
class GlobalBatch:
    """One global batch in its final (shuffled) order. All arrays have length B."""

    step: int
    domains: np.ndarray   # int64 domain index of each sample
    indices: np.ndarray   # int64 sample index within its domain
    epochs: np.ndarray    # int64 domain epoch the sample was drawn in


class MixtureSampler:
    """Deterministic, resumable weighted sampler over domains (see the module docstring).

    Args:
        domain_sizes: samples per domain (0 allowed for domains that must keep weight 0).
        weights: initial weights (normalised internally).
        global_batch_size: samples per optimizer step summed over all ranks (B).
        seed: stream seed.
        rank, world_size: this data-parallel rank; ``B % world_size == 0``.
        max_epochs: optional cap on passes over any domain (``None`` = unlimited).
        domain_names: names for error messages and telemetry.
        history_limit: keep at most this many weight-history entries (``None`` = all). The history
            documents the run; resuming needs only the current state.
        cache_max_size, cache_budget_bytes: see :class:`PermutationCache`.
    """

    def __init__(self, domain_sizes: Sequence[int], weights, *, global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, max_epochs: int | None = None,
                 domain_names: Sequence[str] | None = None, history_limit: int | None = None,
                 cache_max_size: int = 1 << 22, cache_budget_bytes: int = 256 << 20):
        sizes = [int(s) for s in domain_sizes]
        if not sizes:
            raise ValueError("need at least one domain")
        if any(s < 0 for s in sizes):
            raise ValueError(f"domain sizes must be >= 0, got {sizes}")
        if int(global_batch_size) < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by "
                             f"world_size ({world_size})")
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1 or None, got {max_epochs}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.domain_sizes = np.asarray(sizes, dtype=np.int64)
        self.domain_names = list(domain_names) if domain_names is not None else [str(i) for i in range(len(sizes))]
        if len(self.domain_names) != len(sizes):
            raise ValueError("domain_names and domain_sizes differ in length")
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.max_epochs = max_epochs
        self.history_limit = history_limit
        self._cache = PermutationCache(cache_max_size, cache_budget_bytes)
        self._keys: dict[tuple[int, int], int] = {}
        D = len(sizes)
        self._step = 0
        self._cursor = np.zeros(D, dtype=np.int64)
        self._epoch = np.zeros(D, dtype=np.int64)
        self._residual = np.zeros(D, dtype=np.int64)
        self._counts = np.zeros(D, dtype=np.int64)
        self._history: list[tuple[int, list[float]]] = []
        self._weights = np.zeros(D)
        self._q = np.zeros(D, dtype=np.int64)
        self.set_weights(weights)

    # ------------------------------------------------------------------ weights
    @property
    def num_domains(self) -> int:
        return len(self.domain_sizes)

    @property
    def weights(self) -> np.ndarray:
        """Current normalised weights (a copy)."""
        return self._weights.copy()

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``(step, weights)`` entries: the weights in force from ``step`` on. This is the run's one
        weight history (``MixtureLoader.weight_history``, ``Mixer.weight_history`` read it)."""
        return [(s, list(w)) for s, w in self._history]

    def changes(self, weights) -> bool:
        """Whether ``weights`` would draw differently from the weights in force: the run's one "did the weights
        change?" rule (the allocation uses weights quantised to multiples of 2^-32; smaller moves change nothing)."""
        return not np.array_equal(quantize_weights(validate_weights(weights, self.domain_sizes, self.domain_names)),
                                  self._q)

    def set_weights(self, weights) -> np.ndarray:
        """Use ``weights`` from the next global batch on. O(D). Returns the normalised weights."""
        w = validate_weights(weights, self.domain_sizes, self.domain_names)
        q = quantize_weights(w)
        self._weights, self._q = w, q
        entry = (self._step, w.tolist())
        if self._history and self._history[-1][0] == self._step:
            self._history[-1] = entry
        elif not self._history or not np.array_equal(quantize_weights(np.asarray(self._history[-1][1])), q):
            self._history.append(entry)
        if self.history_limit is not None and len(self._history) > self.history_limit:
            del self._history[:len(self._history) - self.history_limit]
        return w.copy()

    # ------------------------------------------------------------------ stepping
    @property
    def step(self) -> int:
        """Index of the next global batch."""
        return self._step

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def step_counts(self) -> np.ndarray:
        """Per-domain counts the next global batch will have (does not advance)."""
        return allocate(self._residual + self.global_batch_size * self._q, self._q > 0, self.global_batch_size)

    def _key(self, d: int, epoch: int) -> int:
        k = self._keys.get((d, epoch))
        if k is None:
            if len(self._keys) > 4 * self.num_domains:
                self._keys.clear()
            k = self._keys[(d, epoch)] = derive_key(self.seed, _TAG_DOMAIN, d, epoch)
        return k

    def _segments(self, counts: np.ndarray, cursor: np.ndarray, epoch: np.ndarray):
        """Split each domain's draw into (domain, epoch, start, length) runs; updates cursor/epoch in place."""
        segs = []
        sizes = self.domain_sizes
        for d in np.flatnonzero(counts).tolist():
            c, cur, ep, n = int(counts[d]), int(cursor[d]), int(epoch[d]), int(sizes[d])
            while c > 0:
                if cur >= n:
                    cur, ep = 0, ep + 1
                if self.max_epochs is not None and ep >= self.max_epochs:
                    raise DomainExhaustedError(
                        f"domain {self.domain_names[d]!r} ({n} samples) is exhausted: it needs more "
                        f"samples after max_epochs={self.max_epochs} passes (at step {self._step}); "
                        "raise loader.max_epochs (0 = no limit), lower the domain's weight or add data to it")
                k = min(c, n - cur)
                segs.append((d, ep, cur, k))
                cur += k
                c -= k
            cursor[d], epoch[d] = cur, ep
        return segs

    def _resolve(self, segs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Domain, permuted sample index and epoch of every draw, in segment order."""
        total = sum(s[3] for s in segs)
        doms = np.empty(total, dtype=np.int64)
        idx = np.empty(total, dtype=np.int64)
        eps = np.empty(total, dtype=np.int64)
        lazy = []  # (offset, segment) evaluated in one vectorised Feistel call
        off = 0
        for seg in segs:
            d, ep, start, k = seg
            doms[off:off + k] = d
            eps[off:off + k] = ep
            n = int(self.domain_sizes[d])
            arr = self._cache.array(n, self._key(d, ep), (d, ep))
            if arr is not None:
                idx[off:off + k] = arr[start:start + k]
            else:
                lazy.append((off, seg))
            off += k
        if lazy:
            lens = np.asarray([s[3] for _, s in lazy], dtype=np.int64)
            offs = np.asarray([o for o, _ in lazy], dtype=np.int64)
            starts = np.asarray([s[2] for _, s in lazy], dtype=np.int64)
            ns = np.asarray([int(self.domain_sizes[s[0]]) for _, s in lazy], dtype=np.int64)
            keys = np.asarray([self._key(s[0], s[1]) for _, s in lazy], dtype=np.uint64)
            first = np.cumsum(lens) - lens
            within = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(first, lens)
            dest = np.repeat(offs, lens) + within
            idx[dest] = feistel_many(np.repeat(starts, lens) + within, np.repeat(ns, lens), np.repeat(keys, lens))
        return doms, idx, eps

    def next_global(self) -> GlobalBatch:
        """Advance one step and return the whole global batch (identical on every rank)."""
        B = self.global_batch_size
        target = self._residual + B * self._q
        counts = allocate(target, self._q > 0, B)
        cursor, epoch = self._cursor.copy(), self._epoch.copy()
        doms, idx, eps = self._resolve(self._segments(counts, cursor, epoch))
        order = hash_order(B, derive_key(self.seed, _TAG_BATCH, self._step))
        batch = GlobalBatch(self._step, doms[order], idx[order], eps[order])
        # commit only after everything succeeded (an exhausted domain leaves the state untouched)
        self._residual = target - counts * Q
        self._cursor, self._epoch = cursor, epoch
        self._counts += counts
        self._step += 1
        return batch

    def rank_slice(self, batch: GlobalBatch) -> slice:
        """This rank's contiguous slice of a global batch."""
        b = self.local_batch_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def next_step_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance one step; ``(domains, indices, epochs)`` of this rank's share, in batch order."""
        g = self.next_global()
        sl = self.rank_slice(g)
        return g.domains[sl], g.indices[sl], g.epochs[sl]

    def next_step(self) -> list[tuple[int, int]]:
        """Advance one step; this rank's share of the global batch as ``(domain, index)`` pairs."""
        d, i, _ = self.next_step_arrays()
        return list(zip(d.tolist(), i.tolist()))

    # ------------------------------------------------------------------ introspection
    @property
    def counts(self) -> np.ndarray:
        """Samples drawn so far per domain (all ranks together)."""
        return self._counts.copy()

    @property
    def epochs(self) -> np.ndarray:
        """Current epoch index per domain (0 = first pass)."""
        return self._epoch.copy()

    @property
    def cursors(self) -> np.ndarray:
        """Position within the current epoch per domain."""
        return self._cursor.copy()

    @property
    def residuals(self) -> np.ndarray:
        """Carried deficits ``e_d`` in samples (cumulative target minus realised count)."""
        return self._residual / float(Q)

    def epochs_completed(self) -> np.ndarray:
        """Fractional passes per domain: epoch + cursor / size (0 for empty domains)."""
        sizes = np.maximum(self.domain_sizes, 1)
        return np.where(self.domain_sizes > 0, self._epoch + self._cursor / sizes, 0.0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Global (rank-independent) state; JSON-serialisable."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "rounds": ROUNDS, "q_bits": Q_BITS,
            "seed": self.seed, "global_batch_size": self.global_batch_size,
            "domain_sizes": self.domain_sizes.tolist(), "domain_names": list(self.domain_names),
            "step": self._step, "weights": self._weights.tolist(), "quantized": self._q.tolist(),
            "history": [[s, list(w)] for s, w in self._history],
            "cursor": self._cursor.tolist(), "epoch": self._epoch.tolist(),
            "residual": self._residual.tolist(), "counts": self._counts.tolist(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state from :meth:`state_dict` (any world size; same global batch size)."""
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a MixtureSampler state (format={sd.get('format')!r})")
        if sd.get("version") != STATE_VERSION or sd.get("rounds") != ROUNDS or sd.get("q_bits") != Q_BITS:
            raise ValueError(f"incompatible MixtureSampler state version {sd.get('version')} "
                             f"(rounds {sd.get('rounds')}, q_bits {sd.get('q_bits')}); this build "
                             f"writes version {STATE_VERSION}, rounds {ROUNDS}, q_bits {Q_BITS}")
        if int(sd["global_batch_size"]) != self.global_batch_size:
            raise ValueError(
                f"checkpoint global_batch_size={sd['global_batch_size']} but this run uses "
                f"{self.global_batch_size}: the sample stream is defined per global batch, so resume "
                "with the same global batch size (the world size and micro-batch size may change)")
        if list(sd["domain_sizes"]) != self.domain_sizes.tolist():
            raise ValueError(f"checkpoint domain sizes {sd['domain_sizes']} differ from this run's "
                             f"{self.domain_sizes.tolist()}: the data (or seq_len, or domain list) changed")
        if int(sd["seed"]) != self.seed:
            raise ValueError(f"checkpoint seed {sd['seed']} differs from this run's seed {self.seed}")
        q = np.asarray(sd["quantized"], dtype=np.int64)
        validate_weights(sd["weights"], self.domain_sizes, self.domain_names)
        w = np.asarray(sd["weights"], dtype=np.float64)  # already normalised: keep the exact bits
        if not np.array_equal(quantize_weights(w), q):
            raise ValueError("checkpoint weights and quantized weights disagree (corrupt state)")
        residual = np.asarray(sd["residual"], dtype=np.int64)
        cursor = np.asarray(sd["cursor"], dtype=np.int64)
        if residual.sum() != 0 or np.any(cursor < 0) or np.any(cursor > self.domain_sizes):
            raise ValueError("checkpoint residuals/cursors are inconsistent (corrupt state)")
        self._step = int(sd["step"])
        self._weights, self._q = w, q
        self._history = [(int(s), [float(x) for x in ws]) for s, ws in sd["history"]]
        self._cursor = cursor
        self._epoch = np.asarray(sd["epoch"], dtype=np.int64)
        self._residual = residual
        self._counts = np.asarray(sd["counts"], dtype=np.int64)
        self._cache.clear()

    def checksum(self) -> int:
        """A signed 64-bit digest of the full state; equal on all ranks iff their states agree."""
        blob = json.dumps(self.state_dict(), sort_keys=True).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little", signed=True)

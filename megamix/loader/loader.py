"""``MixtureLoader``: micro-batches of token windows from the memory-mapped token store.

A domain's **packed stream** is its train (or valid) ``.bin`` read as one flat token array:
megamix's token store already ends every document with EOS, so documents are simply concatenated.
Sample ``i`` of a domain is the window ``stream[i*T : i*T + T + 1]`` (``T = seq_len``): consecutive
windows share one token, so every token of the stream is a training target exactly once per
epoch, and a domain with ``N`` tokens has ``(N - 1) // T`` samples (a trailing partial window is
dropped). Which samples are drawn, in which order and on which rank is the job of
:class:`~megamix.loader.sampler.MixtureSampler`; see its module docstring for the semantics.

A :class:`Batch` carries ``input_ids = window[:-1]`` and ``labels = window[1:]`` (no ``-100``
in training windows, all tokens are real), the domain id, ``position_ids`` that start at 0 at the
window start and restart at 0 at every document start inside it (Megatron's
``reset_position_ids``; positions are always ``< T``, so absolute position embeddings of size T
suffice), ``segment_ids`` numbering the documents inside the window (0, 1, ...), and a global
``sample_ids`` = ``domain_offset[d] + i`` (domain offsets in loader order), which identifies the
window independently of epoch and rank.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from megamix.loader.distributed import verify_consistent, weights_checksum
from megamix.loader.sampler import MixtureSampler
from megamix.loader.telemetry import MixtureTelemetry

IGNORE_INDEX = -100
STATE_FORMAT = "megamix.MixtureLoader"


@dataclass
class Batch:
    """One micro-batch. Token tensors are ``[b, T]`` int64, the rest ``[b]`` int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    domain_ids: torch.Tensor
    position_ids: torch.Tensor
    sample_ids: torch.Tensor
    segment_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class DomainWindows:
    """Fixed ``seq_len + 1`` windows at stride ``seq_len`` over one domain split's packed stream.

    Args:
        dataset: an ``IndexedTokenDataset`` (needs ``.tokens`` and ``.doc_offsets``).
        seq_len: T.
    """

    def __init__(self, dataset, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = dataset.tokens
        self.doc_offsets = np.asarray(dataset.doc_offsets, dtype=np.int64)
        self.seq_len = int(seq_len)
        self.num_tokens = int(len(self.tokens))
        self.num_samples = max(0, (self.num_tokens - 1) // self.seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def _layout(self, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Position-in-document and document ordinal (within the window) of ``width`` tokens per start.

        Only the document boundaries inside each window are looked up (two binary searches per
        row); positions then follow from a running maximum of the boundary offsets.
        """
        b = len(starts)
        offs = self.doc_offsets
        lo = np.searchsorted(offs, starts, side="right") - 1            # document of the first token
        hi = np.searchsorted(offs, starts + width - 1, side="right") - 1  # document of the last token
        nb = hi - lo                                                    # boundaries inside the window
        rows = np.repeat(np.arange(b), nb)
        k = np.arange(int(nb.sum()), dtype=np.int64) - np.repeat(np.cumsum(nb) - nb, nb)
        cols = offs[np.repeat(lo, nb) + 1 + k] - np.repeat(starts, nb)
        base = np.full((b, width), np.iinfo(np.int64).min, dtype=np.int64)
        base[:, 0] = 0  # every window starts at position 0 (positions stay < T, as Megatron's)
        base[rows, cols] = cols
        np.maximum.accumulate(base, axis=1, out=base)
        positions = np.arange(width, dtype=np.int64)[None, :] - base
        mark = np.zeros((b, width), dtype=np.int64)
        mark[rows, cols] = 1
        return positions, np.cumsum(mark, axis=1, out=mark)

    def _check(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples})")

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, labels, positions, segments)``, each ``[b, T]`` int64, of the given samples."""
        idx = np.asarray(indices, dtype=np.int64)
        self._check(idx)
        T = self.seq_len
        starts = idx * T
        inp = np.empty((len(idx), T), dtype=np.int64)
        lab = np.empty((len(idx), T), dtype=np.int64)
        for r, s in enumerate(starts.tolist()):
            inp[r] = self.tokens[s:s + T]
            lab[r] = self.tokens[s + 1:s + T + 1]
        positions, segments = self._layout(starts, T)
        return inp, lab, positions, segments


def _to_batch(inp, lab, positions, segments, domain_ids, sample_ids) -> Batch:
    return Batch(input_ids=torch.from_numpy(inp), labels=torch.from_numpy(lab),
                 domain_ids=torch.from_numpy(np.asarray(domain_ids, dtype=np.int64)),
                 position_ids=torch.from_numpy(positions),
                 sample_ids=torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
                 segment_ids=torch.from_numpy(segments))


class MixtureLoader:
    """Weighted, deterministic, resumable micro-batches from a :class:`~megamix.data.store.TokenStore`.

    Args:
        store: a ``TokenStore`` (anything with ``.domains`` and ``.dataset(domain, split)``).
        domains: domains to mix, in this order (``None`` = ``store.domains``). Domain ids in
            batches index this list.
        split: ``"train"`` or ``"valid"``.
        seq_len: tokens per training sequence (windows hold ``seq_len + 1``).
        global_batch_size: sequences per optimizer step over all ranks.
        micro_batch_size: sequences per forward pass on one rank; must divide
            ``global_batch_size / world_size``.
        weights: initial weights: a sequence in ``domains`` order or a mapping name -> weight.
        seed: stream seed.
        rank, world_size: this data-parallel rank.
        max_epochs: optional cap on passes over any domain.
        telemetry_window: steps in the "last window" telemetry shares.
        history_limit, cache_max_size, cache_budget_bytes: passed to :class:`MixtureSampler`.
    """

    def __init__(self, store, domains: Sequence[str] | None = None, *, split: str = "train", seq_len: int,
                 global_batch_size: int, micro_batch_size: int, weights, seed: int, rank: int = 0,
                 world_size: int = 1, max_epochs: int | None = None, telemetry_window: int = 100,
                 history_limit: int | None = None, cache_max_size: int = 1 << 22,
                 cache_budget_bytes: int = 256 << 20):
        self.domains = list(store.domains if domains is None else domains)
        if not self.domains:
            raise ValueError("no domains to load")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"duplicate domains in {self.domains}")
        unknown = [d for d in self.domains if d not in store.domains]
        if unknown:
            raise ValueError(f"domains {unknown} are not in the token store (it has {store.domains})")
        if world_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by world_size ({world_size})")
        local = global_batch_size // world_size
        if micro_batch_size < 1 or local % micro_batch_size:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must divide the per-rank batch "
                             f"global_batch_size/world_size = {local}")
        self.store = store
        self.split = split
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.windows = [DomainWindows(store.dataset(d, split), self.seq_len) for d in self.domains]
        self.domain_sizes = np.asarray([len(w) for w in self.windows], dtype=np.int64)
        self.domain_offsets = np.concatenate([[0], np.cumsum(self.domain_sizes)[:-1]]).astype(np.int64)
        self.sampler = MixtureSampler(
            self.domain_sizes.tolist(), self._weight_vector(weights), global_batch_size=global_batch_size,
            seed=seed, rank=rank, world_size=world_size, max_epochs=max_epochs, domain_names=self.domains,
            history_limit=history_limit, cache_max_size=cache_max_size, cache_budget_bytes=cache_budget_bytes)
        self._telemetry = MixtureTelemetry(self.domains, telemetry_window, self.seq_len)

    # ------------------------------------------------------------------ weights
    def _weight_vector(self, weights) -> np.ndarray:
        if isinstance(weights, Mapping):
            extra = sorted(set(weights) - set(self.domains))
            missing = [d for d in self.domains if d not in weights]
            if extra or missing:
                raise ValueError(f"weight mapping does not match the domains: unknown {extra}, missing {missing}")
            return np.asarray([float(weights[d]) for d in self.domains])
        return weights  # validated (and converted) by the sampler

    def changes(self, weights) -> bool:
        """Whether ``weights`` would change the sample stream (:meth:`MixtureSampler.changes`)."""
        return self.sampler.changes(self._weight_vector(weights))

    def set_weights(self, weights, *, verify: bool = False, group=None) -> np.ndarray:
        """New weights (sequence in domain order, or mapping) from the next step on. O(D).

        Pass weights that are already identical on every rank (from
        :func:`~megamix.loader.distributed.broadcast_weights`). With ``verify=True`` (debug mode)
        a checksum all-reduce over ``group`` raises ``RuntimeError`` if any rank's weights differ.
        """
        w = self.sampler.set_weights(self._weight_vector(weights))
        if verify:
            verify_consistent(weights_checksum(w), group=group, what="mixture weights")
        return w

    @property
    def weights(self) -> np.ndarray:
        return self.sampler.weights

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``(step, weights)``: the weights in force from each step on (the sampler's history, which
        is checkpointed with the loader and defines the sample stream)."""
        return self.sampler.weight_history

    @property
    def step(self) -> int:
        return self.sampler.step

    @property
    def rank(self) -> int:
        return self.sampler.rank

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    # ------------------------------------------------------------------ batches
    def assemble(self, domains: np.ndarray, indices: np.ndarray) -> Batch:
        """Read the windows of ``(domain, index)`` pairs into one :class:`Batch` (rows in that order)."""
        b, T = len(domains), self.seq_len
        out = [np.empty((b, T), dtype=np.int64) for _ in range(4)]
        for d in np.unique(domains).tolist():
            rows = np.flatnonzero(domains == d)
            for o, part in zip(out, self.windows[d].gather(indices[rows])):
                o[rows] = part
        return _to_batch(*out, domains, self.domain_offsets[domains] + indices)

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next optimizer step on this rank."""
        g = self.sampler.next_global()
        sl = self.sampler.rank_slice(g)
        doms, idx = g.domains[sl], g.indices[sl]
        D = len(self.domains)
        # the weights in force for this step are still the current ones (set_weights acts on the next)
        self._telemetry.record(np.bincount(g.domains, minlength=D), self.sampler.weights,
                               np.bincount(doms, minlength=D))
        full = self.assemble(doms, idx)  # one read per domain for the whole local batch
        m = self.micro_batch_size
        return [Batch(**{f.name: getattr(full, f.name)[i:i + m] for f in fields(Batch)})
                for i in range(0, len(doms), m)]

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    # ------------------------------------------------------------------ telemetry, checkpoints
    def telemetry(self) -> dict:
        """Per-domain realised share vs target (cumulative and last window), samples seen, epochs."""
        s = self.sampler
        counts = s.counts
        return self._telemetry.report(step=s.step, weights=s.weights, counts=counts,
                                      cumulative_target=counts + s.residuals, epochs=s.epochs,
                                      epochs_completed=s.epochs_completed())

    def state_dict(self) -> dict:
        """Global state (identical on every rank): sampler, telemetry and a data fingerprint."""
        return {"format": STATE_FORMAT, "domains": list(self.domains), "split": self.split,
                "seq_len": self.seq_len, "domain_sizes": self.domain_sizes.tolist(),
                "sampler": self.sampler.state_dict(), "telemetry": self._telemetry.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` output; world size and micro-batch size may differ."""
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a MixtureLoader state (format={sd.get('format')!r})")
        if list(sd["domains"]) != self.domains:
            raise ValueError(f"checkpoint domains {sd['domains']} differ from this loader's {self.domains}")
        if int(sd["seq_len"]) != self.seq_len:
            raise ValueError(f"checkpoint seq_len={sd['seq_len']} but this loader uses {self.seq_len}; "
                             "the samples would be different windows")
        if list(sd["domain_sizes"]) != self.domain_sizes.tolist():
            raise ValueError("checkpoint domain sizes differ from the token store's: the data changed")
        self.sampler.load_state_dict(sd["sampler"])
        self._telemetry.load_state_dict(sd["telemetry"])


def eval_batches(store, domain: str, *, seq_len: int, batch_size: int, max_batches: int | None = None,
                 split: str = "valid", domain_id: int | None = None, rank: int = 0,
                 world_size: int = 1) -> Iterator[Batch]:
    """Deterministic sequential validation windows of one domain.

    Window ``i`` covers ``stream[i*T : i*T + T + 1]`` of the split's packed stream, in order; a
    trailing partial window (at least one target) is padded with EOS and its padded labels are
    ``-100``. Batches hold ``batch_size`` consecutive windows (the last may be smaller); with
    ``world_size > 1`` rank r gets batches r, r+W, ... . ``max_batches`` caps the batches in total
    (before sharding), so the evaluated set does not depend on the world size.

    Args:
        domain_id: the id put in ``domain_ids`` (default: the domain's index in ``store.domains``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
    win = DomainWindows(store.dataset(domain, split), seq_len)
    did = store.domains.index(domain) if domain_id is None else int(domain_id)
    N, T = win.num_tokens, win.seq_len
    n_full = win.num_samples
    n_total = n_full + (1 if N - n_full * T >= 2 else 0)
    n_batches = -(-n_total // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    eos = int(getattr(store, "eos_id", 0))
    for bi in range(rank, n_batches, world_size):
        lo, hi = bi * batch_size, min(n_total, (bi + 1) * batch_size)
        ids = np.arange(lo, hi, dtype=np.int64)
        inp, lab, pos, seg = win.gather(ids[ids < n_full])
        if hi > n_full:  # the trailing partial window (index n_full)
            s = n_full * T
            real = np.asarray(win.tokens[s:N], dtype=np.int64)
            row = np.full(T + 1, eos, dtype=np.int64)
            row[:len(real)] = real
            row_lab = row[1:].copy()
            row_lab[len(real) - 1:] = IGNORE_INDEX
            p, g = win._layout(np.asarray([s]), T)
            inp, lab = np.vstack([inp, row[None, :-1]]), np.vstack([lab, row_lab[None]])
            pos, seg = np.vstack([pos, p]), np.vstack([seg, g])
        yield _to_batch(inp, lab, pos, seg, np.full(len(ids), did), ids)

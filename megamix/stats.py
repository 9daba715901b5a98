"""DomainStats: per-domain accumulators of projected per-sample gradients over one mixing round.

It accumulates, across micro-steps (and optimizer steps) of a round:
- ``sums [D,k]``: Σ g_i over the round's samples of each domain (float64),
- ``counts [D]``: samples seen per domain,
- ``loss_sum [D]`` / ``token_count [D]``: train token-loss totals (for the mean train loss per domain),
- optionally the per-sample rows ``g_i`` with their domain ids, global sample ids, reservoir keys and
  train-loss totals: all of them, or (``max_rows=R``) a bounded reservoir of R rows.

``all_reduce(group)`` sums the accumulators over data-parallel ranks and merges the per-sample rows
(rank order). The Gram ``S Sᵀ`` is computed from the (reduced) sums in :meth:`snapshot`.

**The reservoir** (``max_rows=R``, what DoGraph uses): every row carries a 63-bit key, a seeded hash of
the sample's identity in the round (:func:`sample_keys`: the loader step and the sample id), and the
round keeps the R rows with the smallest keys, i.e. a uniform sample without replacement of the round's
samples. Each rank keeps its own R smallest (memory: R rows of ``k`` fp32 plus 5 numbers, whatever the
global batch); :meth:`DomainStats.all_reduce` all-gathers the R keys of every rank (``world × R`` int64),
picks the R smallest of all, and sums one ``[R, k + 4]`` float64 buffer in which each rank has written
its surviving rows at their slots (one all-reduce of ``R·(k+4)`` values). The result is the same set of
rows for any number of ranks and any micro-batch split, so a 2-rank run and a 1-rank run over the same
global batches hold identical reservoirs.

**Where the accumulators live.** On the device the gradients are computed on (the GPU), for the whole round:
:meth:`update` never reads a device value on the host, so it adds no host sync to a micro-step (domain ids,
sample ids and reservoir keys come from the loader and are checked on the host, where they live). State
restored from a checkpoint (on the CPU) moves to the device of the next :meth:`update`. The collectives go
through :mod:`megamix.comm`, which hands NCCL device tensors. :meth:`snapshot` is the round's one
device-to-host copy: every accumulator and per-sample row packed into one buffer.
"""
from __future__ import annotations

import numpy as np
import torch

from megamix import comm
from megamix.kernels.utils import no_autocast
from megamix.loader.permutation import derive_key, keyed_hash
from megamix.snapshot import StatsSnapshot

_NO_KEY = torch.iinfo(torch.int64).max   # pads key gathers; sorts after every real (63-bit) key


def sample_keys(seed: int, step: int, sample_ids) -> torch.Tensor:
    """Reservoir keys ``[B]`` (int64, 0 <= key < 2^63) of the samples ``sample_ids`` drawn at loader step
    ``step``: a seeded hash of (step, sample id), so a sample has the same key on whichever rank and in
    whichever micro-batch it is processed."""
    ids = np.asarray(torch.as_tensor(sample_ids).cpu(), dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("sample ids must be >= 0 to key the reservoir")
    h = keyed_hash(ids, derive_key(int(seed), int(step))) >> np.uint64(1)
    return torch.from_numpy(h.astype(np.int64))


class DomainStats:
    """Accumulator of per-domain projected-gradient statistics.

    Args:
        num_domains: D.
        k: dimension of each projected per-sample gradient row.
        keep_per_sample: also keep the per-sample rows (needed by DoGraph-style strategies).
        device: where accumulators live (default: the device of the first ``update``).
        max_rows: keep at most this many per-sample rows per round, the reservoir of the module docstring
            (None: every row, which grows with the round's global batch).
        key_seed: seed of the keys given to rows that come without ``keys`` (a per-rank counter; such a
            reservoir is deterministic but depends on how samples were split over ranks).
    """

    def __init__(self, num_domains: int, k: int, keep_per_sample: bool = True,
                 device: torch.device | str | None = None, *, max_rows: int | None = None, key_seed: int = 0):
        if num_domains < 1 or k < 1:
            raise ValueError(f"DomainStats needs num_domains >= 1 and k >= 1, got {num_domains}, {k}")
        if max_rows is not None and int(max_rows) < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.num_domains = int(num_domains)
        self.k = int(k)
        self.keep_per_sample = bool(keep_per_sample)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.key_seed = int(key_seed)
        self.device = torch.device(device) if device is not None else None
        self.reset()

    # ------------------------------------------------------------------------------------------
    def _alloc(self, device: torch.device) -> None:
        D, k = self.num_domains, self.k
        self.device = device
        self.sums = torch.zeros(D, k, dtype=torch.float64, device=device)
        self.counts = torch.zeros(D, dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros(D, dtype=torch.float64, device=device)
        self.token_count = torch.zeros(D, dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Start a new round (zero every accumulator, drop per-sample rows)."""
        self._alloc(self.device or torch.device("cpu"))
        self._rows: list[torch.Tensor] = []
        self._row_domains: list[torch.Tensor] = []
        self._row_ids: list[torch.Tensor] = []
        self._row_keys: list[torch.Tensor] = []
        self._row_loss: list[torch.Tensor] = []    # [n, 2] float64: token-loss sum, token count (nan: unknown)
        self._counter = 0                          # rows seen this round on this rank (keys of unkeyed rows)
        self.reduced = False
        self._mark = None

    def mark(self) -> None:
        """Remember the accumulators now, so that :meth:`rollback` can drop whatever is added after this point
        (the statistics of an optimizer step that is then skipped)."""
        # the row lists themselves (shallow copies): appends and reservoir shrinks after this point replace or
        # extend the lists but never modify a tensor already in them
        self._mark = (self.sums.clone(), self.counts.clone(), self.loss_sum.clone(), self.token_count.clone(),
                      [list(x) for x in (self._rows, self._row_domains, self._row_ids, self._row_keys,
                                         self._row_loss)], self._counter, self.reduced)

    def rollback(self) -> None:
        """Drop everything added since the last :meth:`mark` (no-op without one)."""
        m = getattr(self, "_mark", None)
        if m is None:
            return
        self.sums, self.counts, self.loss_sum, self.token_count = m[0], m[1], m[2], m[3]
        self.device = self.sums.device
        self._rows, self._row_domains, self._row_ids, self._row_keys, self._row_loss = m[4]
        self._counter, self.reduced = m[5], m[6]
        self._mark = None

    @property
    def num_samples(self) -> int:
        """Samples recorded this round (reads the counts: a host sync when they live on a GPU)."""
        return int(self.counts.sum().item())

    def to(self, device: torch.device | str) -> "DomainStats":
        """Move every accumulator and per-sample row to ``device`` (in place; returns self)."""
        dev = torch.device(device)
        if self.sums.device == dev:
            return self
        self.device = dev
        self.sums, self.counts, self.loss_sum, self.token_count = (
            t.to(dev) for t in (self.sums, self.counts, self.loss_sum, self.token_count))
        for lst in (self._rows, self._row_domains, self._row_ids, self._row_keys, self._row_loss):
            lst[:] = [t.to(dev) for t in lst]
        return self

    # ------------------------------------------------------------------------------------------
    def update(self, g: torch.Tensor, domain_ids: torch.Tensor, sample_ids: torch.Tensor | None = None,
               token_loss_sum: torch.Tensor | None = None, token_count: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> None:
        """Add one micro-step. No host sync: nothing computed on the device is read on the host.

        Args:
            g: ``[B, k]`` projected per-sample gradients; the accumulators live on ``g``'s device (they move
                there if they were elsewhere, e.g. restored from a checkpoint on the CPU).
            domain_ids: ``[B]`` domain index of each sample (checked against ``num_domains`` when it is a host
                tensor, as the loader's are).
            sample_ids: optional ``[B]`` global sample identities (kept with per-sample rows).
            token_loss_sum: optional ``[B]`` sum of each sample's (unscaled) token losses.
            token_count: optional ``[B]`` number of loss-bearing tokens per sample (required with
                ``token_loss_sum``).
            keys: optional ``[B]`` reservoir keys (:func:`sample_keys`); default: a seeded hash of this
                rank's running row count.
        """
        if self.reduced:
            raise RuntimeError("DomainStats.update after all_reduce: call reset() to start a new round first")
        if g.dim() != 2 or g.shape[1] != self.k:
            raise ValueError(f"g must be [B, {self.k}], got {tuple(g.shape)}")
        B = g.shape[0]
        if domain_ids.dim() != 1 or domain_ids.shape[0] != B:
            raise ValueError(f"domain_ids must be [{B}], got {tuple(domain_ids.shape)}")
        if domain_ids.device.type == "cpu" and B:   # host ids (the loader's): checked for free
            lo, hi = int(domain_ids.min()), int(domain_ids.max())
            if lo < 0 or hi >= self.num_domains:
                raise ValueError(f"domain ids must be in [0, {self.num_domains}), got [{lo}, {hi}]")
        if token_loss_sum is not None:
            if token_count is None:
                raise ValueError("token_count is required together with token_loss_sum")
            if token_loss_sum.shape != (B,) or token_count.shape != (B,):
                raise ValueError(f"token_loss_sum and token_count must be [{B}]")
        if sample_ids is not None and sample_ids.shape != (B,):
            raise ValueError(f"sample_ids must be [{B}], got {tuple(sample_ids.shape)}")
        if keys is not None and keys.shape != (B,):
            raise ValueError(f"keys must be [{B}], got {tuple(keys.shape)}")
        self.to(g.device)
        dev = g.device
        dom = domain_ids.to(dev, non_blocking=True).long()
        gd = g.detach().to(torch.float64)
        # Per-domain sums as a product with the samples' one-hot domain matrix [D, B]: deterministic on a GPU,
        # where index_add_ adds with atomics in no fixed order (and float64 sums would differ run to run).
        onehot = torch.zeros(self.num_domains, B, dtype=torch.float64, device=dev)
        onehot[dom, torch.arange(B, device=dev)] = 1.0
        with no_autocast(dev):
            self.sums.addmm_(onehot, gd)
            self.counts.add_(onehot.sum(1))
            if token_loss_sum is not None:
                self.loss_sum.addmv_(onehot, token_loss_sum.detach().to(dev, torch.float64, non_blocking=True))
                self.token_count.addmv_(onehot, token_count.detach().to(dev, torch.float64, non_blocking=True))
        if self.keep_per_sample:
            self._rows.append(gd.to(torch.float32))
            self._row_domains.append(dom)
            if sample_ids is not None:
                self._row_ids.append(sample_ids.to(dev, non_blocking=True).long())
            else:
                self._row_ids.append(torch.full((B,), -1, dtype=torch.long, device=dev))
            if keys is None:
                keys = torch.from_numpy((keyed_hash(np.arange(self._counter, self._counter + B),
                                                    derive_key(self.key_seed, 1 << 40)) >> np.uint64(1))
                                        .astype(np.int64))
            self._counter += B
            self._row_keys.append(keys.to(dev, non_blocking=True).long())
            if token_loss_sum is not None:
                lc = torch.stack([token_loss_sum.detach().to(dev, torch.float64, non_blocking=True),
                                  token_count.detach().to(dev, torch.float64, non_blocking=True)], dim=1)
            else:
                lc = torch.full((B, 2), float("nan"), dtype=torch.float64, device=dev)
            self._row_loss.append(lc)
            if self.max_rows is not None and sum(r.shape[0] for r in self._rows) > self.max_rows:
                self._shrink()

    # ------------------------------------------------------------------------------------------
    def _local_rows(self) -> tuple[torch.Tensor, ...]:
        """(rows [n,k] fp32, domains [n], ids [n], keys [n], loss [n,2] float64) in arrival order."""
        dev = self.sums.device
        if not self._rows:
            z = torch.zeros(0, dtype=torch.long, device=dev)
            return (torch.zeros(0, self.k, device=dev), z, z.clone(), z.clone(),
                    torch.zeros(0, 2, dtype=torch.float64, device=dev))
        return (torch.cat(self._rows), torch.cat(self._row_domains), torch.cat(self._row_ids),
                torch.cat(self._row_keys), torch.cat(self._row_loss))

    def _set_rows(self, rows, doms, ids, keys, loss) -> None:
        self._rows, self._row_domains, self._row_ids = [rows], [doms], [ids]
        self._row_keys, self._row_loss = [keys], [loss]

    def _shrink(self) -> None:
        """Keep the ``max_rows`` rows with the smallest keys (ties: earlier rows), in arrival order."""
        rows, doms, ids, keys, loss = self._local_rows()
        keep = torch.sort(keys, stable=True).indices[:self.max_rows].sort().values
        self._set_rows(rows[keep], doms[keep], ids[keep], keys[keep], loss[keep])

    def all_reduce(self, group=None) -> None:
        """Sum sums/counts/losses over the ranks of ``group`` and merge the per-sample rows (rank order):
        all of them, or with ``max_rows`` the reservoir's R smallest keys over all ranks (module docstring).

        The collectives (:mod:`megamix.comm`) run on the group's device: for NCCL the accumulators' own GPU. A
        no-op (except marking the round reduced) when torch.distributed is not initialised or the group has one
        rank. Every rank must call it, with the same ``keep_per_sample``."""
        if self.reduced:
            raise RuntimeError("DomainStats.all_reduce called twice in one round")
        self.reduced = True
        world = comm.size(group)
        if world == 1:
            return
        D, k = self.num_domains, self.k
        flat = torch.cat([self.sums.reshape(-1), self.counts, self.loss_sum, self.token_count])
        comm.all_reduce(flat, "sum", group)
        o = 0
        self.sums = flat[o:o + D * k].reshape(D, k).clone(); o += D * k
        self.counts = flat[o:o + D].clone(); o += D
        self.loss_sum = flat[o:o + D].clone(); o += D
        self.token_count = flat[o:o + D].clone()
        if not self.keep_per_sample:
            return
        rows, doms, ids, keys, loss = self._local_rows()
        dev = rows.device
        if self.max_rows is None:   # every row of every rank, in rank order (the row counts are read on the host)
            ns = [int(x) for x in torch.cat(comm.all_gather(
                torch.tensor([rows.shape[0]], dtype=torch.long, device=dev), group)).tolist()]
            m = max(ns)
            packed = torch.zeros(m, k + 4, dtype=torch.float64, device=dev)
            packed[:rows.shape[0]] = _pack(rows, doms, ids, loss)
            outs = comm.all_gather(packed, group)
            kpad = torch.full((m,), _NO_KEY, dtype=torch.long, device=dev)
            kpad[:keys.shape[0]] = keys
            kouts = comm.all_gather(kpad, group)
            r_, d_, i_, l_ = _unpack(torch.cat([o_[:c] for o_, c in zip(outs, ns)]), k)
            self._set_rows(r_, d_, i_, torch.cat([o_[:c] for o_, c in zip(kouts, ns)]), l_)
            return
        # The reservoir: the R smallest keys over all ranks, each row summed into its slot by the one rank that
        # holds it. Fixed shapes throughout (no host read): fewer than R rows in all leave empty slots, whose key
        # is _NO_KEY; snapshot() drops them on the host.
        R = self.max_rows
        kpad = torch.full((R,), _NO_KEY, dtype=torch.long, device=dev)
        kpad[:keys.shape[0]] = keys
        flat = torch.stack(comm.all_gather(kpad, group)).reshape(-1)   # [world * R], rank-major, arrival order
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.sort(flat, stable=True).indices[:R]] = True
        chosen &= flat != _NO_KEY
        slot = torch.where(chosen, torch.cumsum(chosen, 0) - 1, torch.full_like(flat, R))  # R = no slot
        me = comm.rank(group)
        mine = slot[me * R:me * R + keys.shape[0]]
        packed = torch.zeros(R + 1, k + 4, dtype=torch.float64, device=dev)
        packed.index_copy_(0, mine, _pack(rows, doms, ids, loss))       # dropped rows land in the spare row R
        packed = comm.all_reduce(packed[:R].contiguous(), "sum", group)  # one rank holds each slot
        sel = torch.full((R + 1,), _NO_KEY, dtype=torch.long, device=dev).scatter_(0, slot, flat)[:R]
        r_, d_, i_, l_ = _unpack(packed, k)
        self._set_rows(r_, d_, i_, sel, l_)

    # ------------------------------------------------------------------------------------------
    def _to_host(self) -> tuple[np.ndarray, ...]:
        """Every accumulator and per-sample row in one device-to-host copy: ``(sums [D,k], counts [D], loss_sum [D],
        token_count [D], rows [n,k] fp32, domains [n], ids [n], keys [n], loss [n,2])`` as numpy, the reservoir's
        empty slots (key ``_NO_KEY``) dropped. The float64 parts travel as their int64 bit patterns next to the
        int64 keys, so every value arrives exactly."""
        D, k = self.num_domains, self.k
        parts = [self.sums.reshape(-1), self.counts, self.loss_sum, self.token_count]
        rows, doms, ids, keys, loss = self._local_rows()
        n = rows.shape[0]
        parts.append(_pack(rows, doms, ids, loss).reshape(-1))
        flat = torch.cat([torch.cat(parts).view(torch.int64), keys.reshape(-1)]).cpu().numpy()
        f = flat[:flat.size - n].view(np.float64)
        host_keys = flat[flat.size - n:]
        o = 0
        sums = f[o:o + D * k].reshape(D, k); o += D * k
        counts, loss_sum, tok = f[o:o + D], f[o + D:o + 2 * D], f[o + 2 * D:o + 3 * D]; o += 3 * D
        p = f[o:].reshape(n, k + 4)
        real = host_keys != _NO_KEY
        p, host_keys = p[real], host_keys[real]
        return (sums, counts, loss_sum, tok, p[:, :k].astype(np.float32), p[:, k].astype(np.int64),
                p[:, k + 1].astype(np.int64), host_keys, p[:, k + 2:k + 4].copy())

    def snapshot(self, step: int, domain_names: list[str]) -> StatsSnapshot:
        """Numpy snapshot of the round (call after :meth:`all_reduce` for global statistics): the round's one
        device-to-host copy."""
        if len(domain_names) != self.num_domains:
            raise ValueError(f"{len(domain_names)} domain names for {self.num_domains} domains")
        sums, counts, loss_sum, tok, rows, doms, ids, keys, lc = self._to_host()
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(tok > 0, loss_sum / np.maximum(tok, 1.0), np.nan)
        per_sample = per_dom = None
        extra: dict = {"reduced": self.reduced}
        if self.keep_per_sample:
            per_sample, per_dom = rows, doms
            extra["per_sample_ids"] = ids
            extra["per_sample_keys"] = keys
            with np.errstate(invalid="ignore", divide="ignore"):
                extra["per_sample_loss"] = np.where(lc[:, 1] > 0, lc[:, 0] / lc[:, 1], np.nan)
        return StatsSnapshot(step=int(step), domain_names=list(domain_names),
                             counts=counts.round().astype(np.int64), sums=sums,
                             gram=sums @ sums.T, domain_loss=loss, per_sample=per_sample,
                             per_sample_domain=per_dom, extra=extra)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """CPU tensors + config; restores the round in progress exactly (one device-to-host copy)."""
        sums, counts, loss_sum, tok, rows, doms, ids, keys, loss = self._to_host()
        t = torch.from_numpy
        return {"num_domains": self.num_domains, "k": self.k, "keep_per_sample": self.keep_per_sample,
                "sums": t(sums.copy()), "counts": t(counts.copy()), "loss_sum": t(loss_sum.copy()),
                "token_count": t(tok.copy()), "rows": t(rows), "row_domains": t(doms), "row_ids": t(ids),
                "row_keys": t(keys.copy()), "row_loss": t(loss), "counter": self._counter,
                "max_rows": self.max_rows, "reduced": self.reduced}

    def load_state_dict(self, sd: dict) -> None:
        if (sd["num_domains"], sd["k"]) != (self.num_domains, self.k):
            raise ValueError(f"state is for D={sd['num_domains']}, k={sd['k']} but this DomainStats has "
                             f"D={self.num_domains}, k={self.k}")
        dev = self.device or torch.device("cpu")
        self.keep_per_sample = bool(sd["keep_per_sample"])
        self.sums = sd["sums"].to(dev, torch.float64).clone()
        self.counts = sd["counts"].to(dev, torch.float64).clone()
        self.loss_sum = sd["loss_sum"].to(dev, torch.float64).clone()
        self.token_count = sd["token_count"].to(dev, torch.float64).clone()
        if sd.get("max_rows", self.max_rows) != self.max_rows:
            raise ValueError(f"state keeps at most {sd.get('max_rows')} per-sample rows but this DomainStats keeps "
                             f"{self.max_rows}; resume with the same mixing.dograph_reservoir")
        n = sd["rows"].shape[0]
        self._rows, self._row_domains, self._row_ids, self._row_keys, self._row_loss = [], [], [], [], []
        if n:   # states written before rows had keys and losses: keys from the arrival order, losses unknown
            keys = sd.get("row_keys", torch.arange(n, dtype=torch.long))
            loss = sd.get("row_loss", torch.full((n, 2), float("nan"), dtype=torch.float64))
            self._set_rows(*(t.to(dev).clone() for t in (sd["rows"], sd["row_domains"], sd["row_ids"], keys, loss)))
        self._counter = int(sd.get("counter", n))
        self.reduced = bool(sd["reduced"])

    @staticmethod
    def merge_states(states: list[dict], rank: int = 0) -> dict:
        """The :meth:`state_dict` of rank ``rank`` of a new world size, from ``states``: the states of every rank
        of the old one, in old-rank order, saved in the same round (a resume on another number of ranks).

        A round's accumulators are per-rank partial sums that :meth:`all_reduce` adds at the round's end, so the new
        rank 0 gets their sum (sums, counts, loss and token totals; the unkeyed-row counters) and the per-sample rows
        of every old rank in rank order, with ``max_rows`` only the R smallest keys (ties: the earlier rank), in that
        order: the rule :meth:`all_reduce` keeps rows by. Every other new rank gets an empty round (only
        ``states[0]`` is read for it; pass just that). The round's final all-reduce then sums to what the old
        ranks would have reached. States of a round already reduced (identical on every rank) are passed on
        as rank 0's. Raises ValueError when the states do not belong together."""
        if not states:
            raise ValueError("merge_states needs the state of at least old rank 0")
        first = states[0]
        shape = ("num_domains", "k", "keep_per_sample", "max_rows", "reduced")
        for i, sd in enumerate(states[1:], 1):
            if any(sd.get(f) != first.get(f) for f in shape):
                raise ValueError(f"DomainStats states of old ranks 0 and {i} differ in "
                                 f"{[f for f in shape if sd.get(f) != first.get(f)]}: not one round of one run")
        if first["reduced"]:
            return {**first}
        k = int(first["k"])
        out = {**first, "counter": 0, "reduced": False,
               "rows": torch.zeros(0, k), "row_domains": torch.zeros(0, dtype=torch.long),
               "row_ids": torch.zeros(0, dtype=torch.long), "row_keys": torch.zeros(0, dtype=torch.long),
               "row_loss": torch.zeros(0, 2, dtype=torch.float64)}
        for f in ("sums", "counts", "loss_sum", "token_count"):
            out[f] = torch.zeros_like(first[f], dtype=torch.float64)
        if rank != 0:
            return out
        for f in ("sums", "counts", "loss_sum", "token_count"):
            out[f] = torch.stack([sd[f].to(torch.float64) for sd in states]).sum(0)
        out["counter"] = sum(int(sd.get("counter", sd["rows"].shape[0])) for sd in states)
        full = [sd for sd in states if sd["rows"].shape[0]]
        if not full:
            return out
        cat = {f: torch.cat([sd[f] for sd in full]) for f in ("rows", "row_domains", "row_ids", "row_keys", "row_loss")}
        R = first["max_rows"]
        if R is not None and cat["rows"].shape[0] > R:   # _shrink's and all_reduce's rule: the R smallest keys
            keep = torch.sort(cat["row_keys"], stable=True).indices[:R].sort().values
            cat = {f: v[keep] for f, v in cat.items()}
        return out | cat


def _pack(rows, doms, ids, loss) -> torch.Tensor:
    """``[n, k + 4]`` float64: the row, its domain, its sample id, its loss sum and token count (exact:
    fp32 values, ids < 2^53)."""
    return torch.cat([rows.double(), doms.double()[:, None], ids.double()[:, None], loss], dim=1)


def _unpack(p: torch.Tensor, k: int):
    return p[:, :k].float(), p[:, k].long(), p[:, k + 1].long(), p[:, k + 2:k + 4].clone()


__all__ = ["DomainStats", "sample_keys"]

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
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

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
        return int(self.counts.sum().item())

    # ------------------------------------------------------------------------------------------
    def update(self, g: torch.Tensor, domain_ids: torch.Tensor, sample_ids: torch.Tensor | None = None,
               token_loss_sum: torch.Tensor | None = None, token_count: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> None:
        """Add one micro-step.

        Args:
            g: ``[B, k]`` projected per-sample gradients.
            domain_ids: ``[B]`` domain index of each sample.
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
        if self.sums.device != g.device:
            if self.num_samples == 0 and not self._rows:
                self._alloc(g.device)
            else:
                g = g.to(self.sums.device)
        dev = self.sums.device
        dom = domain_ids.to(dev).long()
        if B and (int(dom.min()) < 0 or int(dom.max()) >= self.num_domains):
            raise ValueError(f"domain ids must be in [0, {self.num_domains}), got [{int(dom.min())}, "
                             f"{int(dom.max())}]")
        gd = g.detach().to(torch.float64)
        self.sums.index_add_(0, dom, gd)
        self.counts.index_add_(0, dom, torch.ones(B, dtype=torch.float64, device=dev))
        if token_loss_sum is not None:
            if token_count is None:
                raise ValueError("token_count is required together with token_loss_sum")
            if token_loss_sum.shape != (B,) or token_count.shape != (B,):
                raise ValueError(f"token_loss_sum and token_count must be [{B}]")
            self.loss_sum.index_add_(0, dom, token_loss_sum.detach().to(dev, torch.float64))
            self.token_count.index_add_(0, dom, token_count.detach().to(dev, torch.float64))
        if self.keep_per_sample:
            self._rows.append(gd.to(torch.float32))
            self._row_domains.append(dom)
            if sample_ids is not None:
                if sample_ids.shape != (B,):
                    raise ValueError(f"sample_ids must be [{B}], got {tuple(sample_ids.shape)}")
                self._row_ids.append(sample_ids.to(dev).long())
            else:
                self._row_ids.append(torch.full((B,), -1, dtype=torch.long, device=dev))
            if keys is None:
                keys = torch.from_numpy((keyed_hash(np.arange(self._counter, self._counter + B),
                                                    derive_key(self.key_seed, 1 << 40)) >> np.uint64(1))
                                        .astype(np.int64))
            elif keys.shape != (B,):
                raise ValueError(f"keys must be [{B}], got {tuple(keys.shape)}")
            self._counter += B
            self._row_keys.append(keys.to(dev).long())
            lc = torch.full((B, 2), float("nan"), dtype=torch.float64, device=dev)
            if token_loss_sum is not None:
                lc[:, 0] = token_loss_sum.detach().to(dev, torch.float64)
                lc[:, 1] = token_count.detach().to(dev, torch.float64)
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

        A no-op (except marking the round reduced) when torch.distributed is not initialised or the
        group has one rank. Every rank must call it, with the same ``keep_per_sample``."""
        if self.reduced:
            raise RuntimeError("DomainStats.all_reduce called twice in one round")
        self.reduced = True
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        D, k = self.num_domains, self.k
        flat = torch.cat([self.sums.reshape(-1), self.counts, self.loss_sum, self.token_count])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        o = 0
        self.sums = flat[o:o + D * k].reshape(D, k).clone(); o += D * k
        self.counts = flat[o:o + D].clone(); o += D
        self.loss_sum = flat[o:o + D].clone(); o += D
        self.token_count = flat[o:o + D].clone()
        if not self.keep_per_sample:
            return
        rows, doms, ids, keys, loss = self._local_rows()
        dev = rows.device
        if self.max_rows is None:   # every row of every rank, in rank order
            n = torch.tensor([rows.shape[0]], dtype=torch.long, device=dev)
            ns = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(ns, n, group=group)
            ns = [int(x.item()) for x in ns]
            m = max(ns)
            packed = torch.zeros(m, k + 4, dtype=torch.float64, device=dev)
            packed[:rows.shape[0]] = _pack(rows, doms, ids, loss)
            outs = [torch.zeros_like(packed) for _ in range(world)]
            dist.all_gather(outs, packed, group=group)
            kpad = torch.full((m,), _NO_KEY, dtype=torch.long, device=dev)
            kpad[:keys.shape[0]] = keys
            kouts = [torch.empty_like(kpad) for _ in range(world)]
            dist.all_gather(kouts, kpad, group=group)
            r_, d_, i_, l_ = _unpack(torch.cat([o_[:c] for o_, c in zip(outs, ns)]), k)
            self._set_rows(r_, d_, i_, torch.cat([o_[:c] for o_, c in zip(kouts, ns)]), l_)
            return
        # the reservoir: the R smallest keys over all ranks, rows summed into their slots
        R = self.max_rows
        kpad = torch.full((R,), _NO_KEY, dtype=torch.long, device=dev)
        kpad[:keys.shape[0]] = keys
        kouts = [torch.empty_like(kpad) for _ in range(world)]
        dist.all_gather(kouts, kpad, group=group)
        allk = torch.stack(kouts)                                     # [world, R], rank-major
        flat = allk.reshape(-1)
        chosen = torch.sort(flat, stable=True).indices[:R]
        chosen = chosen[flat[chosen] != _NO_KEY].sort().values        # rank order, arrival order in a rank
        me = dist.get_rank(group)
        mine = (chosen // R) == me
        packed = torch.zeros(chosen.shape[0], k + 4, dtype=torch.float64, device=dev)
        packed[mine] = _pack(rows, doms, ids, loss)[chosen[mine] % R]
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        r_, d_, i_, l_ = _unpack(packed, k)
        self._set_rows(r_, d_, i_, flat[chosen], l_)

    # ------------------------------------------------------------------------------------------
    def snapshot(self, step: int, domain_names: list[str]) -> StatsSnapshot:
        """Numpy snapshot of the round (call after :meth:`all_reduce` for global statistics)."""
        if len(domain_names) != self.num_domains:
            raise ValueError(f"{len(domain_names)} domain names for {self.num_domains} domains")
        sums = self.sums.cpu().numpy()
        tok = self.token_count.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(tok > 0, self.loss_sum.cpu().numpy() / np.maximum(tok, 1.0), np.nan)
        per_sample = per_dom = None
        extra: dict = {"reduced": self.reduced}
        if self.keep_per_sample:
            rows, doms, ids, keys, lc = self._local_rows()
            per_sample = rows.cpu().numpy()
            per_dom = doms.cpu().numpy()
            extra["per_sample_ids"] = ids.cpu().numpy()
            extra["per_sample_keys"] = keys.cpu().numpy()
            lc = lc.cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                extra["per_sample_loss"] = np.where(lc[:, 1] > 0, lc[:, 0] / lc[:, 1], np.nan)
        return StatsSnapshot(step=int(step), domain_names=list(domain_names),
                             counts=self.counts.cpu().numpy().round().astype(np.int64), sums=sums,
                             gram=sums @ sums.T, domain_loss=loss, per_sample=per_sample,
                             per_sample_domain=per_dom, extra=extra)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """CPU tensors + config; restores the round in progress exactly."""
        rows, doms, ids, keys, loss = self._local_rows()
        return {"num_domains": self.num_domains, "k": self.k, "keep_per_sample": self.keep_per_sample,
                "sums": self.sums.cpu(), "counts": self.counts.cpu(), "loss_sum": self.loss_sum.cpu(),
                "token_count": self.token_count.cpu(), "rows": rows.cpu(), "row_domains": doms.cpu(),
                "row_ids": ids.cpu(), "row_keys": keys.cpu(), "row_loss": loss.cpu(), "counter": self._counter,
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


def _pack(rows, doms, ids, loss) -> torch.Tensor:
    """``[n, k + 4]`` float64: the row, its domain, its sample id, its loss sum and token count (exact:
    fp32 values, ids < 2^53)."""
    return torch.cat([rows.double(), doms.double()[:, None], ids.double()[:, None], loss], dim=1)


def _unpack(p: torch.Tensor, k: int):
    return p[:, :k].float(), p[:, k].long(), p[:, k + 1].long(), p[:, k + 2:k + 4].clone()


__all__ = ["DomainStats", "sample_keys"]

"""DomainStats: per-domain accumulators of projected per-sample gradients over one mixing round.

It accumulates, across micro-steps (and optimizer steps) of a round:
- ``sums [D,k]``: Σ g_i over the round's samples of each domain (float64),
- ``counts [D]``: samples seen per domain,
- ``loss_sum [D]`` / ``token_count [D]``: train token-loss totals (for the mean train loss per domain),
- optionally the per-sample rows ``g_i`` with their domain ids (and global sample ids).

``all_reduce(group)`` sums the accumulators over data-parallel ranks and all-gathers the per-sample
rows (rank order). The Gram ``S Sᵀ`` is computed from the (reduced) sums in :meth:`snapshot`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megamix.snapshot import StatsSnapshot


class DomainStats:
    """Accumulator of per-domain projected-gradient statistics.

    Args:
        num_domains: D.
        k: dimension of each projected per-sample gradient row.
        keep_per_sample: also keep the per-sample rows (needed by DoGraph-style strategies).
        device: where accumulators live (default: the device of the first ``update``).
    """

    def __init__(self, num_domains: int, k: int, keep_per_sample: bool = True,
                 device: torch.device | str | None = None):
        if num_domains < 1 or k < 1:
            raise ValueError(f"DomainStats needs num_domains >= 1 and k >= 1, got {num_domains}, {k}")
        self.num_domains = int(num_domains)
        self.k = int(k)
        self.keep_per_sample = bool(keep_per_sample)
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
        self.reduced = False
        self._mark = None

    def mark(self) -> None:
        """Remember the accumulators now, so that :meth:`rollback` can drop whatever is added after this point
        (the statistics of an optimizer step that is then skipped)."""
        self._mark = (self.sums.clone(), self.counts.clone(), self.loss_sum.clone(), self.token_count.clone(),
                      len(self._rows), len(self._row_domains), len(self._row_ids), self.reduced)

    def rollback(self) -> None:
        """Drop everything added since the last :meth:`mark` (no-op without one)."""
        m = getattr(self, "_mark", None)
        if m is None:
            return
        self.sums, self.counts, self.loss_sum, self.token_count = m[0], m[1], m[2], m[3]
        self.device = self.sums.device
        del self._rows[m[4]:], self._row_domains[m[5]:], self._row_ids[m[6]:]
        self.reduced = m[7]
        self._mark = None

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum().item())

    # ------------------------------------------------------------------------------------------
    def update(self, g: torch.Tensor, domain_ids: torch.Tensor, sample_ids: torch.Tensor | None = None,
               token_loss_sum: torch.Tensor | None = None, token_count: torch.Tensor | None = None) -> None:
        """Add one micro-step.

        Args:
            g: ``[B, k]`` projected per-sample gradients.
            domain_ids: ``[B]`` domain index of each sample.
            sample_ids: optional ``[B]`` global sample identities (kept with per-sample rows).
            token_loss_sum: optional ``[B]`` sum of each sample's (unscaled) token losses.
            token_count: optional ``[B]`` number of loss-bearing tokens per sample (required with
                ``token_loss_sum``).
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

    # ------------------------------------------------------------------------------------------
    def _local_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.sums.device
        if not self._rows:
            return (torch.zeros(0, self.k, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                    torch.zeros(0, dtype=torch.long, device=dev))
        return torch.cat(self._rows), torch.cat(self._row_domains), torch.cat(self._row_ids)

    def all_reduce(self, group=None) -> None:
        """Sum sums/counts/losses over the ranks of ``group`` and all-gather per-sample rows (rank order).

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
        if self.keep_per_sample:
            rows, doms, ids = self._local_rows()
            dev = rows.device
            n = torch.tensor([rows.shape[0]], dtype=torch.long, device=dev)
            ns = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(ns, n, group=group)
            ns = [int(x.item()) for x in ns]
            m = max(ns)
            packed = torch.zeros(m, k + 2, dtype=torch.float64, device=dev)
            packed[:rows.shape[0], :k] = rows.double()
            packed[:rows.shape[0], k] = doms.double()
            packed[:rows.shape[0], k + 1] = ids.double()
            outs = [torch.zeros_like(packed) for _ in range(world)]
            dist.all_gather(outs, packed, group=group)
            allp = torch.cat([o_[:c] for o_, c in zip(outs, ns)])
            self._rows = [allp[:, :k].float()]
            self._row_domains = [allp[:, k].long()]
            self._row_ids = [allp[:, k + 1].long()]

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
            rows, doms, ids = self._local_rows()
            per_sample = rows.cpu().numpy()
            per_dom = doms.cpu().numpy()
            extra["per_sample_ids"] = ids.cpu().numpy()
        return StatsSnapshot(step=int(step), domain_names=list(domain_names),
                             counts=self.counts.cpu().numpy().round().astype(np.int64), sums=sums,
                             gram=sums @ sums.T, domain_loss=loss, per_sample=per_sample,
                             per_sample_domain=per_dom, extra=extra)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """CPU tensors + config; restores the round in progress exactly."""
        rows, doms, ids = self._local_rows()
        return {"num_domains": self.num_domains, "k": self.k, "keep_per_sample": self.keep_per_sample,
                "sums": self.sums.cpu(), "counts": self.counts.cpu(), "loss_sum": self.loss_sum.cpu(),
                "token_count": self.token_count.cpu(), "rows": rows.cpu(), "row_domains": doms.cpu(),
                "row_ids": ids.cpu(), "reduced": self.reduced}

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
        self._rows = [sd["rows"].to(dev).clone()] if sd["rows"].shape[0] else []
        self._row_domains = [sd["row_domains"].to(dev).clone()] if sd["rows"].shape[0] else []
        self._row_ids = [sd["row_ids"].to(dev).clone()] if sd["rows"].shape[0] else []
        self.reduced = bool(sd["reduced"])


__all__ = ["DomainStats"]

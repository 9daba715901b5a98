"""The LM-head driver: megamix's fused loss, the reweighted loss, held-out gradients and the recording of the
per-sample statistics, for every path that computes the LM head's loss (the loop's fused and capture paths,
the Hugging Face patch and Trainer, Megatron's vocab-parallel head, a hand-written loop).

The :class:`~megamix.mixer.Mixer` holds one (``mixer.head``) and exposes its user API (``lm_head_loss``,
``loss_and_stats``). With a gradient reweighter (DoGraph, :class:`~megamix.strategies.base.GradientReweighter`)
that has its table, both paths weight every sample's loss in-step: the sample's factor ``ω_i`` (its nearest
centroid's ``π_c / q_c``) normalised to mean 1 over the micro-batch's samples, ``w_i = ω_i · b / Σ_j ω_j``
(:meth:`LMHeadDriver.sample_weights`). The weights reach the whole network: the fused kernel weights dX and dW
per token (``row_weights``; the factors come from each chunk's own projections before its dX/dW, chunks being
cut at sample boundaries), the capture scales the logits gradient δ per sample. The loss *value* returned stays
the unweighted mean cross-entropy (the number logged), its gradient is that of ``Σ_i w_i ℓ_i``. The statistics
record the unweighted per-sample gradients.

Nothing here reads the device from the host: rows, losses and factors stay where they are computed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch

from megamix.kernels.domain_gram import per_sample_grads
from megamix.kernels.fused_linear_ce import fused_linear_cross_entropy, head_input
from megamix.kernels.projection import make_projection
from megamix.loader import eval_batches
from megamix.stats import DomainStats, sample_keys


class LMHeadDriver:
    """The LM-head loss and statistics of one run.

    Args:
        cfg: the run config (``projection``, ``mixing``, ``model``, ``train`` sections).
        stats: the run's :class:`~megamix.stats.DomainStats` (rows are added to it).
        store, domains: the token store and the trained domains (held-out gradients read their validation split).
        world_size: data-parallel ranks (the gradient the optimizer applies is the mean over them).
        loader_step: returns the loader's current step (the reservoir key of each sample).
        reweighter: the strategy's :class:`~megamix.strategies.base.GradientReweighter`, or None.
    """

    def __init__(self, cfg, stats: DomainStats, store, domains: list[str], *, world_size: int,
                 loader_step: Callable[[], int], reweighter: Any = None):
        self.cfg, self.stats, self.store, self.domains = cfg, stats, store, domains
        self.world_size = world_size
        self.loader_step = loader_step
        self.reweighter = reweighter
        p = cfg.projection
        self.k = p.k if p.k > 0 else p.k1 * p.k2   # dimension of one projected per-sample gradient
        self.projection = None  # built lazily once V and d are known
        #: each sample's share of the applied gradient: the mean over micro-steps (and ranks, in the kernel's δ)
        self.grad_scale = 1.0 / (cfg.train.global_batch_size // cfg.train.micro_batch_size)
        #: the per-sample loss weights of the last reweighted micro-batch (``[b]``, mean 1 over its samples)
        self.last_sample_weights: torch.Tensor | None = None

    def projection_for(self, V: int, d: int, device=None, dtype=torch.float32):
        """The run's projection for an LM head of shape (V, d), drawn once from ``projection.seed``
        (identical on every rank); every path (fused, capture, held-out gradients) uses it."""
        p = self.cfg.projection
        if self.projection is None or self.projection.V != V or self.projection.d != d:
            self.projection = make_projection(V, d, p.k1, p.k2, seed=p.seed, kind=p.kind,
                                              device=device, dtype=dtype, k=p.k if p.k > 0 else None)
        return self.projection

    @property
    def collecting(self) -> bool:
        return bool(self.cfg.projection.enabled)

    def lm_head_loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     domain_ids: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None, *,
                     num_items_in_batch: int | torch.Tensor | None = None, record: bool = True) -> torch.Tensor:
        """The LM head's cross-entropy through megamix's fused kernel, recording the statistics.

        Args:
            hidden: the LM head's input ``[b, T, d]``.
            weight: the LM-head matrix ``[V, d]`` (the tied embedding when tied). The head's GEMMs run, as
                ``F.linear``'s would, in the autocast dtype under autocast (fp32 master weights under bf16
                autocast: bf16 operands, fp32 accumulation, an fp32 gradient for the weight), else in the
                weight's dtype (bf16 weights of a DeepSpeed bf16 engine: a bf16 head). The statistics (u, w,
                the token losses) are fp32 either way.
            labels: next-token targets ``[b, T]`` (already shifted; -100 = ignore).
            domain_ids, sample_ids: ``[b]``; ``domain_ids`` is required when statistics are recorded.
            num_items_in_batch: HF Trainer's token count across gradient accumulation: the loss is then
                ``sum / num_items_in_batch`` (else the mean over this micro-batch's valid tokens).
            record: record statistics (only when ``projection.enabled`` and autograd is on).

        Returns the scalar loss (differentiable w.r.t. hidden and weight); the full ``[b·T, V]`` logits
        never exist. With a gradient reweighter (``dograph``) that has its table, the gradient is
        that of the per-sample weighted loss (see the module docstring) while the value stays the plain
        mean cross-entropy.
        """
        b, T, d = hidden.shape
        labels = labels.to(hidden.device, non_blocking=True)
        if labels.shape != (b, T):
            raise ValueError(f"labels must be [{b}, {T}] like the hidden states, got {tuple(labels.shape)}")
        record = self.will_record(domain_ids, record)
        hidden = head_input(hidden, weight)
        proj = self.projection_for(weight.shape[0], d, hidden.device) if record else None
        # Scale g to the sample's share of the gradient the optimizer applies: the mean over micro-steps
        # and data-parallel ranks (the same convention as the capture path).
        scale = self.grad_scale
        if num_items_in_batch is not None:   # HF Trainer passes a (device) tensor: keep it there, no host read
            scale = 1.0 / (num_items_in_batch * self.world_size)
        kw = dict(ignore_index=-100, reduction="mean" if num_items_in_batch is None else "sum", projection=proj,
                  chunk_tokens=self.cfg.projection.chunk_tokens, backend=self.cfg.projection.backend,
                  u_method=self.cfg.projection.u_method)
        if record and self.reweighting:
            return self._reweighted_loss(hidden.reshape(b * T, d), weight, labels, domain_ids, sample_ids,
                                         proj, scale, num_items_in_batch, kw)
        out = fused_linear_cross_entropy(hidden.reshape(b * T, d), weight, labels.reshape(-1), **kw)
        loss = out.loss
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        if record:
            self.record(out.u, out.w, out.token_loss, labels, domain_ids, sample_ids, scale=scale)
        return loss

    def _reweighted_loss(self, hidden2, weight, labels, domain_ids, sample_ids, proj, scale, num_items, kw):
        """The fused loss with DoGraph's per-sample weights: each chunk (cut at sample boundaries) gives its
        samples' projected gradients, hence their factors, before the kernel forms its dX/dW."""
        b, T = labels.shape
        dev = hidden2.device
        rows = torch.zeros(b, proj.k, device=dev)
        omega = torch.zeros(b, device=dev)
        valid = torch.zeros(b, dtype=torch.bool, device=dev)

        def row_weights(s, e, u, w):
            i0, i1 = s // T, e // T
            g = proj.finalize(per_sample_grads(u, w, tokens_per_sample=T)) * scale
            rows[i0:i1] = g
            omega[i0:i1], valid[i0:i1] = self._sample_factors(g)
            return omega[i0:i1].repeat_interleave(T)

        out = fused_linear_cross_entropy(hidden2, weight, labels.reshape(-1), row_weights=row_weights, row_group=T,
                                         **kw)
        norm = self._normaliser(omega, valid)
        self.last_sample_weights = (omega * norm).detach()
        weighted = out.loss * norm
        plain = out.token_loss.sum() / (labels != -100).sum() if num_items is None else out.token_loss.sum()
        if num_items is not None:
            weighted, plain = weighted / num_items, plain / num_items
        self._record_rows(rows, out.token_loss, labels, domain_ids, sample_ids)
        return weighted + (plain - weighted).detach()   # value: the plain loss; gradient: the weighted one

    # ------------------------------------------------------------------ DoGraph gradient weights
    @property
    def reweighting(self) -> bool:
        """True when the Mixer holds a gradient reweighter and it has its table (after its first round)."""
        return self.reweighter is not None and self.reweighter.ready

    def _sample_factors(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors ω [B], valid [B]) of recorded rows ``g``; rows that are exactly zero (no loss-bearing
        token) are not samples of the loss: factor 0."""
        valid = (g != 0).any(dim=1)
        om = self.reweighter.sample_factors(g).to(g.device)
        return torch.where(valid, om, torch.zeros_like(om)), valid

    @staticmethod
    def _normaliser(omega: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``n_valid / Σ ω``, so the weights ``ω·norm`` have mean 1 over the valid samples (0 if Σ ω = 0)."""
        tot = omega.sum()
        return torch.where(tot > 0, valid.sum().to(omega.dtype) / tot.clamp_min(1e-30), torch.zeros_like(tot))

    def sample_weights(self, g: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights ``[B]`` of a micro-batch from its recorded rows ``g [B, k]`` (mean 1 over
        the samples with a loss), or None when the strategy does not reweight (yet). The capture path uses
        it; the fused path computes the same per chunk."""
        if not self.reweighting:
            return None
        omega, valid = self._sample_factors(g)
        w = omega * self._normaliser(omega, valid)
        self.last_sample_weights = w.detach()
        return w

    def loss_and_stats(self, hidden: torch.Tensor, weight: torch.Tensor, batch) -> torch.Tensor:
        """``lm_head_loss`` for a loader :class:`~megamix.loader.Batch` (labels, domain and sample ids)."""
        return self.lm_head_loss(hidden, weight, batch.labels, batch.domain_ids,
                                 getattr(batch, "sample_ids", None))

    def will_record(self, domain_ids: torch.Tensor | None, record: bool = True) -> bool:
        """Whether an LM-head call records statistics: asked to (``record``), ``projection.enabled`` and
        autograd on. Raises ``ValueError`` when it would record but has no domain ids."""
        record = record and self.collecting and torch.is_grad_enabled()
        if record and domain_ids is None:
            raise ValueError("megamix: the LM-head loss has no domain ids for its samples; bind the micro-batch "
                             "(patch.set_batch(batch)) or pass domain_ids=")
        return record

    def record(self, u: torch.Tensor, w: torch.Tensor, token_loss: torch.Tensor, labels: torch.Tensor,
               domain_ids: torch.Tensor, sample_ids: torch.Tensor | None = None, *, scale: float | None = None) -> None:
        """Add one micro-batch's fused-kernel outputs to the statistics.

        ``u [b·T, k1]``, ``w [b·T, k2]``, ``token_loss [b·T]`` in batch-first token order for ``labels [b, T]``.
        ``scale`` turns the kernel's δ scaling into each sample's share of the applied gradient (default: the
        mean over micro-steps and data-parallel ranks of this run's batch geometry)."""
        b, T = labels.shape
        g = self.projection.finalize(per_sample_grads(u, w, tokens_per_sample=T))
        self._record_rows(g * (self.grad_scale if scale is None else scale), token_loss, labels, domain_ids,
                          sample_ids)

    def _record_rows(self, g: torch.Tensor, token_loss: torch.Tensor, labels: torch.Tensor,
                     domain_ids: torch.Tensor, sample_ids: torch.Tensor | None) -> None:
        """Everything stays where it was computed (the rows and losses on the device, the loader's ids on the
        host): no host sync, no copy to the CPU (:class:`~megamix.stats.DomainStats` keeps its accumulators on
        the rows' device)."""
        b, T = labels.shape
        valid = (labels != -100)
        loss_sum = (token_loss.detach().reshape(b, T) * valid).sum(1).double()
        self.record_rows(g, domain_ids, sample_ids, token_loss_sum=loss_sum, token_count=valid.sum(1).double())

    def record_rows(self, g: torch.Tensor, domain_ids: torch.Tensor, sample_ids: torch.Tensor | None = None,
                    token_loss_sum: torch.Tensor | None = None, token_count: torch.Tensor | None = None) -> None:
        """Add per-sample rows ``g [B, k]`` (already scaled to each sample's share of the applied gradient)
        to the statistics; the reservoir key of each sample is its (loader step, sample id)."""
        keys = None
        # the loader's sample ids are host tensors: keying them reads nothing from the device
        if sample_ids is not None and self.stats.keep_per_sample and bool((sample_ids >= 0).all()):
            keys = sample_keys(self.cfg.mixing.seed, self.loader_step(), sample_ids)
        self.stats.update(g, domain_ids, sample_ids=sample_ids, token_loss_sum=token_loss_sum,
                          token_count=token_count, keys=keys)

    @torch.no_grad()
    def eval_gradients(self, hidden_fn, weight) -> tuple[np.ndarray, np.ndarray]:
        """Projected gradients of held-out (validation) batches: ``(sums [D, k], counts [D])``.

        ``hidden_fn(batch) -> hidden [b, T, d]`` runs the model up to the LM head (every rank must call
        it under ZeRO-3, whose forward gathers are collective); ``weight`` is the LM-head matrix, or a
        zero-argument callable returning a context manager that yields it (e.g. a ZeRO-3 gather), entered
        once after all hidden states are computed. Every rank computes the same deterministic batches, so
        no communication is needed.
        """
        n = self.cfg.mixing.eval_grad_batches
        work = []
        for i, d in enumerate(self.domains):
            for batch in eval_batches(self.store, d, seq_len=self.cfg.model.seq_len,
                                      batch_size=self.cfg.train.micro_batch_size, max_batches=n):
                work.append((i, hidden_fn(batch), batch.labels))
        counts = np.zeros(len(self.domains))
        sums = None
        ctx = weight() if callable(weight) else contextlib.nullcontext(weight)
        with ctx as W:
            for i, h, labels in work:
                b, T, dim = h.shape
                h = head_input(h, W)
                proj = self.projection_for(W.shape[0], dim, h.device)
                out = fused_linear_cross_entropy(h.reshape(b * T, dim), W,
                                                 labels.reshape(-1).to(h.device, non_blocking=True),
                                                 ignore_index=-100, reduction="mean", projection=proj,
                                                 chunk_tokens=self.cfg.projection.chunk_tokens,
                                                 backend=self.cfg.projection.backend,
                                                 u_method=self.cfg.projection.u_method)
                g = proj.finalize(per_sample_grads(out.u, out.w, tokens_per_sample=T))
                if sums is None:
                    sums = torch.zeros(len(self.domains), self.k, dtype=torch.float64, device=g.device)
                sums[i] += g.double().sum(0)
                counts[i] += b
        # one device-to-host copy for all held-out batches
        return (np.zeros((len(self.domains), self.k)) if sums is None else sums.cpu().numpy()), counts

"""The Mixer: the one object a training loop holds.

It owns the weighted loader, the random projection, the per-domain gradient statistics and the
mixing strategy, and wires them together::

    mixer = Mixer(cfg, store, rank=rank, world_size=world_size, group=None)
    for step in range(start, cfg.train.steps):
        for batch in mixer.next_step():                       # this rank's micro-batches
            hidden = model.transformer(batch.input_ids, ...).last_hidden_state
            loss = mixer.loss_and_stats(hidden, model.lm_head.weight, batch) / n_micro
            loss.backward()
        optimizer.step()
        mixer.step(step)        # every K steps: all-reduce stats -> strategy -> new weights -> loader

Two ways to get the statistics, both feeding the same :class:`megamix.stats.DomainStats`:
- fused (``lm_head_loss`` / ``loss_and_stats``; for Hugging Face models the one-line patch
  :func:`megamix.integrations.hf.apply_megamix`): megamix's chunked linear cross-entropy *is* the
  loss, and emits u = P1 δ and w = P2 a on the way; no logits tensor of size N×V is kept.
- capture (:func:`megamix.integrations.attach`): a hook on an existing LM head reads δ from the
  normal backward (any loss, any model).

With ``mixing.strategy=dograph`` (a strategy with ``reweights_gradient``) both paths also weight every
sample's loss in-step once the strategy has clusters: the sample's factor ``ω_i`` (its nearest
centroid's ``π_c / q_c``, :meth:`DoGraphStrategy.sample_factors`) normalised to mean 1 over the
micro-batch's samples, ``w_i = ω_i · b / Σ_j ω_j`` (:meth:`Mixer.sample_weights`). The weights reach the
whole network: the fused kernel weights dX and dW per token (``row_weights``; the factors come from each
chunk's own projections before its dX/dW, chunks being cut at sample boundaries), the capture scales the
logits gradient δ per sample. The loss *value* returned stays the unweighted mean cross-entropy (the
number logged), its gradient is that of ``Σ_i w_i ℓ_i``. The statistics record the unweighted per-sample
gradients.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from megamix import comm
from megamix.config import MegamixConfig
from megamix.kernels.fused_linear_ce import head_input
from megamix.simplex import unchanged


class Mixer:
    """Loader + projection + DomainStats + strategy, configured from a :class:`MegamixConfig`.

    Args:
        cfg: the run config (``data``, ``train``, ``mixture``, ``projection``, ``mixing`` sections).
        store: a :class:`megamix.data.store.TokenStore`.
        domains: the domains to train on (default: ``cfg.data.domains`` or every domain in the store).
        rank, world_size: data-parallel position of this process.
        group: the data-parallel process group used for all-reduces (None = default group when
            torch.distributed is initialised, else no communication). Its first rank decides the weights.
        pipeline_group: with pipeline parallelism, the group of this rank's pipeline (one rank per stage, in stage
            order; Megatron's ``mpu.get_pipeline_model_parallel_group()``). Only its last stage holds the LM head and
            the statistics: there ``step`` decides as usual and sends the decision to the other stages, which
            receive it in their own ``step`` (every stage calls it), so every stage's loader draws the same
            samples. None: no pipeline, every rank decides with its data-parallel group.
    """

    def __init__(self, cfg: MegamixConfig, store, domains: list[str] | None = None, *, rank: int = 0,
                 world_size: int = 1, group: Any = None, pipeline_group: Any = None):
        from megamix.loader import MixtureLoader
        from megamix.mixture import initial_weights, prior_max_drift
        from megamix.stats import DomainStats
        from megamix.strategies import build_strategy

        self.cfg = cfg
        self.store = store
        self.rank, self.world_size, self.group = rank, world_size, group
        self.pipeline_group = pipeline_group
        self.domains = list(domains or cfg.data.domains or store.domains)
        missing = [d for d in self.domains if d not in store.domains]
        if missing:
            from megamix.configbase import ConfigError
            raise ConfigError(f"domains {missing} are not in the token store {store.domains}; "
                              "fix data.domains or rebuild the corpus (`megamix data build`)")
        token_counts = [store.num_tokens(d, "train") for d in self.domains]
        short = [d for d, n in zip(self.domains, token_counts) if n < cfg.model.seq_len + 1]
        if short:
            from megamix.configbase import ConfigError
            raise ConfigError(f"domains {short} have fewer than seq_len+1={cfg.model.seq_len + 1} training "
                              "tokens, so no sample can be drawn from them; drop them via data.domains "
                              "or lower model.seq_len")
        # natural = the blend weights of data.paths when given, else the training tokens
        self.initial_weights = np.asarray(initial_weights(cfg.mixture, self.domains, store.natural_sizes(self.domains)),
                                          dtype=np.float64)
        self.max_drift = prior_max_drift(cfg.mixture)
        self.loader = MixtureLoader(
            store, self.domains, split="train", seq_len=cfg.model.seq_len,
            global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
            weights=self.initial_weights, seed=cfg.train.seed, rank=rank, world_size=world_size,
            max_epochs=cfg.loader.max_epochs or None, telemetry_window=cfg.loader.telemetry_window,
            history_limit=cfg.loader.history_limit or None)
        p = cfg.projection
        self.k = p.k if p.k > 0 else p.k1 * p.k2   # dimension of one projected per-sample gradient
        self.strategy = build_strategy(cfg.mixing, self.domains, self.initial_weights, max_drift=self.max_drift)
        per_sample = bool(self.strategy.needs_per_sample)
        self.stats = DomainStats(len(self.domains), self.k, keep_per_sample=per_sample,
                                 max_rows=cfg.mixing.dograph_reservoir if per_sample else None,
                                 key_seed=cfg.mixing.seed)
        self.projection = None  # built lazily once V and d are known
        self._grad_scale = 1.0 / (cfg.train.global_batch_size // cfg.train.micro_batch_size)
        #: the per-sample loss weights of the last reweighted micro-batch (``[b]``, mean 1 over its samples)
        self.last_sample_weights: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    def next_step(self):
        """This rank's micro-batches for the next optimizer step."""
        if self.collecting:
            self.stats.mark()
        return self.loader.next_step()

    def discard_step(self) -> None:
        """Forget the statistics recorded since the last :meth:`next_step`: the loop calls it instead of
        :meth:`step` for an optimizer step it skipped (a non-finite loss), so the strategy never sees them.
        The step's samples stay consumed: the sample stream does not depend on skipped steps."""
        self.stats.rollback()

    @property
    def weights(self) -> np.ndarray:
        return np.asarray(self.loader.weights, dtype=np.float64)

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``(step, weights)`` in force from each step on: the loader's history (read-only; it is
        checkpointed in the loader state and defines the sample stream)."""
        return self.loader.weight_history

    # ------------------------------------------------------------------ statistics
    def projection_for(self, V: int, d: int, device=None, dtype=torch.float32):
        """The run's projection for an LM head of shape (V, d), drawn once from ``projection.seed``
        (identical on every rank); every path (fused, capture, held-out gradients) uses it."""
        from megamix.kernels.projection import make_projection
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
        never exist. With a gradient-reweighting strategy (``dograph``) that has clusters, the gradient is
        that of the per-sample weighted loss (see the module docstring) while the value stays the plain
        mean cross-entropy.
        """
        from megamix.kernels.fused_linear_ce import fused_linear_cross_entropy

        b, T, d = hidden.shape
        labels = labels.to(hidden.device, non_blocking=True)
        if labels.shape != (b, T):
            raise ValueError(f"labels must be [{b}, {T}] like the hidden states, got {tuple(labels.shape)}")
        record = self.will_record(domain_ids, record)
        hidden = head_input(hidden, weight)
        proj = self.projection_for(weight.shape[0], d, hidden.device) if record else None
        # Scale g to the sample's share of the gradient the optimizer applies: the mean over micro-steps
        # and data-parallel ranks (the same convention as the capture path).
        scale = self._grad_scale
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
        from megamix.kernels.domain_gram import per_sample_grads
        from megamix.kernels.fused_linear_ce import fused_linear_cross_entropy

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
        """True when the strategy weights per-sample gradients and has its clusters (after the first round)."""
        return bool(getattr(self.strategy, "reweights_gradient", False)) and \
            getattr(self.strategy, "centroids", None) is not None

    def _sample_factors(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors ω [B], valid [B]) of recorded rows ``g``; rows that are exactly zero (no loss-bearing
        token) are not samples of the loss: factor 0."""
        valid = (g != 0).any(dim=1)
        om = self.strategy.sample_factors(g).to(g.device)
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
        from megamix.kernels.domain_gram import per_sample_grads

        b, T = labels.shape
        g = self.projection.finalize(per_sample_grads(u, w, tokens_per_sample=T))
        self._record_rows(g * (self._grad_scale if scale is None else scale), token_loss, labels, domain_ids,
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
        from megamix.stats import sample_keys

        keys = None
        # the loader's sample ids are host tensors: keying them reads nothing from the device
        if sample_ids is not None and self.stats.keep_per_sample and bool((sample_ids >= 0).all()):
            keys = sample_keys(self.cfg.mixing.seed, self.loader.step, sample_ids)
        self.stats.update(g, domain_ids, sample_ids=sample_ids, token_loss_sum=token_loss_sum,
                          token_count=token_count, keys=keys)

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def eval_gradients(self, hidden_fn, weight) -> tuple[np.ndarray, np.ndarray]:
        """Projected gradients of held-out (validation) batches: ``(sums [D, k], counts [D])``.

        ``hidden_fn(batch) -> hidden [b, T, d]`` runs the model up to the LM head (every rank must call
        it under ZeRO-3, whose forward gathers are collective); ``weight`` is the LM-head matrix, or a
        zero-argument callable returning a context manager that yields it (e.g. a ZeRO-3 gather), entered
        once after all hidden states are computed. Every rank computes the same deterministic batches, so
        no communication is needed.
        """
        from megamix.kernels.domain_gram import per_sample_grads
        from megamix.kernels.fused_linear_ce import fused_linear_cross_entropy
        from megamix.loader import eval_batches

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

    def step(self, step: int, hidden_fn=None, lm_head_weight=None) -> dict | None:
        """Call once after each optimizer step ``step`` (0-based).

        Every ``mixing.update_every`` steps: all-reduce the statistics over data-parallel ranks, show
        the snapshot to the strategy, push its proposal to the loader (identically on every rank)
        and reset the accumulators. Returns a telemetry dict on update steps (``snapshot``, ``weights``,
        ``changed``, and ``log``: the strategy's cluster telemetry and fallback reason, if any), else None.
        With ``mixing.eval_grad_batches > 0``, pass ``hidden_fn`` and ``lm_head_weight`` (a tensor, or a
        callable returning a context manager that yields it) so the held-out gradient (R&B's evaluation
        variant) can be computed; see :meth:`eval_gradients`.
        """
        K = self.cfg.mixing.update_every
        if (step + 1) % K != 0:
            return None
        stages = comm.size(self.pipeline_group) if self.pipeline_group is not None else 1
        last_stage = stages - 1
        if stages > 1 and comm.rank(self.pipeline_group) != last_stage:
            # an earlier pipeline stage: no LM head, no statistics; the last stage's decision arrives below
            snap, new, log, verify = None, self.weights, {}, False
        else:
            snap, new, log = self._decide(step, hidden_fn, lm_head_weight)
            verify = self.cfg.loader.verify_weights and self._dist_active()
        if stages > 1:   # the last stage sends the decision to the earlier stages of its pipeline
            new = self._broadcast_decision(new, self.pipeline_group, from_rank=last_stage)
        # the loader quantises weights to multiples of 2^-32; smaller differences are no change
        changed = not unchanged(new, self.weights)
        if changed:
            self.loader.set_weights(new, verify=verify, group=self.group)
        self.stats.reset()
        return {"snapshot": snap, "weights": new, "changed": changed, "log": log}

    def _decide(self, step: int, hidden_fn, lm_head_weight) -> tuple[Any, np.ndarray, dict]:
        """``(snapshot, new weights, log)`` of a round where the statistics are: all-reduce them over the
        data-parallel group, let the strategy observe and propose, take the deciding rank's proposal."""
        dist_on = self._dist_active()
        if dist_on:
            self.stats.all_reduce(self.group)      # on the statistics' device (megamix.comm: NCCL gets GPU tensors)
        snap = self.stats.snapshot(step + 1, self.domains)     # the round's one device-to-host copy
        if self.cfg.mixing.eval_grad_batches > 0 and self.collecting:
            if hidden_fn is None or lm_head_weight is None:
                raise ValueError("mixing.eval_grad_batches > 0: Mixer.step needs hidden_fn and lm_head_weight")
            snap.eval_sums, eval_counts = self.eval_gradients(hidden_fn, lm_head_weight)
            snap.extra["eval_counts"] = eval_counts
        self.strategy.observe(snap)
        new = np.asarray(self.strategy.propose(step + 1), dtype=np.float64)  # drift bound included
        if dist_on:
            # Rule (see megamix.loader.sampler): the group's first rank decides, everyone takes its weights (and
            # DoGraph's cluster table), in one broadcast from that rank (megamix.comm: group_src, not global 0).
            new = self._broadcast_decision(new, self.group)
        info = self.strategy.last_info or {}
        log = {k: info[k] for k in ("cluster_weights", "cluster_shares", "cluster_sizes", "fallback") if k in info}
        return snap, new, log

    def _broadcast_decision(self, new: np.ndarray, group: Any, from_rank: int = 0) -> np.ndarray:
        """Group rank ``from_rank``'s weights on every rank of ``group``, bit for bit, and for a gradient-reweighting
        strategy its cluster table (centroids, π, q) too: one buffer, one broadcast."""
        from megamix.loader import broadcast_weights

        D = len(self.domains)
        st = self.strategy
        if not getattr(st, "reweights_gradient", False):
            return np.asarray(broadcast_weights(new, group, check=False, from_rank=from_rank), dtype=np.float64)
        m_max, k = st.num_clusters(), self.k
        buf = np.zeros(D + 1 + m_max * (k + 2))
        buf[:D] = new
        if st.centroids is not None:
            m = st.centroids.shape[0]
            buf[D] = m
            buf[D + 1:D + 1 + m * (k + 2)] = np.concatenate([st.centroids, st.cluster_weights[:, None],
                                                             st.cluster_shares[:, None]], axis=1).reshape(-1)
        buf = broadcast_weights(buf, group, check=False, from_rank=from_rank)
        m = int(buf[D])
        t = buf[D + 1:D + 1 + m * (k + 2)].reshape(m, k + 2)
        st.set_clusters(*((t[:, :k], t[:, k], t[:, k + 1]) if m else (None, None, None)))
        return np.asarray(buf[:D], dtype=np.float64)

    def _dist_active(self) -> bool:
        return self.world_size > 1 and comm.size(self.group) > 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "strategy": self.strategy.state_dict(),
                "stats": self.stats.state_dict(),
                "domains": self.domains, "projection_seed": self.cfg.projection.seed}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["domains"]) != self.domains:
            from megamix.configbase import ConfigError
            raise ConfigError(f"checkpoint was made with domains {sd['domains']}, this run has "
                              f"{self.domains}; use the same data.domains to resume")
        if sd.get("projection_seed") != self.cfg.projection.seed:
            from megamix.configbase import ConfigError
            raise ConfigError("checkpoint used projection.seed="
                              f"{sd.get('projection_seed')}, config has {self.cfg.projection.seed}")
        self.loader.load_state_dict(sd["loader"])
        self.strategy.load_state_dict(sd["strategy"])
        self.stats.load_state_dict(sd["stats"])

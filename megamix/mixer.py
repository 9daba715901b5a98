"""The Mixer: the one object a training loop holds.

It owns the weighted loader (the one owner of the weights in force), the random projection and the
per-domain gradient statistics (through its LM-head driver, :mod:`megamix.lm_head`) and the mixing
strategy, and wires them together::

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

A strategy that reweights each sample's gradient (DoGraph) is the Mixer's ``reweighter``
(:class:`~megamix.strategies.base.GradientReweighter`); the LM-head driver applies it in-step (see
:mod:`megamix.lm_head`), and its cluster table travels with the weights in each round's one broadcast.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megamix import comm
from megamix.config import MegamixConfig
from megamix.configbase import ConfigError
from megamix.lm_head import LMHeadDriver
from megamix.loader import MixtureLoader, broadcast_weights
from megamix.mixture import initial_weights, prior_max_drift
from megamix.stats import DomainStats
from megamix.strategies import build_strategy
from megamix.strategies.base import GradientReweighter


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

    Every start-up check of the data the run trains on lives here (pre-flight builds a Mixer to run them):
    domains in the store and listed once, long enough for ``model.seq_len``, the mixture and the strategy.
    """

    def __init__(self, cfg: MegamixConfig, store, domains: list[str] | None = None, *, rank: int = 0,
                 world_size: int = 1, group: Any = None, pipeline_group: Any = None):
        self.cfg = cfg
        self.store = store
        self.rank, self.world_size, self.group = rank, world_size, group
        self.pipeline_group = pipeline_group
        self.domains = list(domains or cfg.data.domains or store.domains)
        self._check_domains(store)
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
        #: the strategy, when it reweights per-sample gradients in-step (DoGraph); else None
        self.reweighter = self.strategy if isinstance(self.strategy, GradientReweighter) else None
        per_sample = bool(self.strategy.needs_per_sample)
        self.stats = DomainStats(len(self.domains), self.k, keep_per_sample=per_sample,
                                 max_rows=cfg.mixing.dograph_reservoir if per_sample else None,
                                 key_seed=cfg.mixing.seed)
        #: the LM-head driver: fused loss, reweighting, held-out gradients, recording (:mod:`megamix.lm_head`)
        self.head = LMHeadDriver(cfg, self.stats, store, self.domains, world_size=world_size,
                                 loader_step=lambda: self.loader.step, reweighter=self.reweighter)

    def _check_domains(self, store) -> None:
        """Each training domain is in the store, listed once and long enough for one sample (ConfigError)."""
        dup = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if dup:
            raise ConfigError(f"data.domains lists {dup} more than once; remove the duplicates")
        missing = [d for d in self.domains if d not in store.domains]
        if missing:
            raise ConfigError(f"domains {missing} are not in the token store {store.domains}; "
                              "fix data.domains or rebuild the corpus (`megamix data build`)")
        token_counts = [store.num_tokens(d, "train") for d in self.domains]
        short = [d for d, n in zip(self.domains, token_counts) if n < self.cfg.model.seq_len + 1]
        if short:
            raise ConfigError(f"domains {short} have fewer than model.seq_len+1={self.cfg.model.seq_len + 1} "
                              "training tokens, so no sample can be drawn from them; drop them via data.domains "
                              "or lower model.seq_len")

    # ------------------------------------------------------------------ data
    def next_step(self):
        """This rank's micro-batches for the next optimizer step."""
        if self.head.collecting:
            self.stats.mark()
        return self.loader.next_step()

    def discard_step(self) -> None:
        """Forget the statistics recorded since the last :meth:`next_step`: the loop calls it instead of
        :meth:`step` for an optimizer step it skipped (a non-finite loss), so the strategy never sees them.
        The step's samples stay consumed: the sample stream does not depend on skipped steps."""
        self.stats.rollback()

    @property
    def weights(self) -> np.ndarray:
        """The weights in force: the loader's (their one owner)."""
        return np.asarray(self.loader.weights, dtype=np.float64)

    @property
    def weight_history(self) -> list[tuple[int, list[float]]]:
        """``(step, weights)`` in force from each step on: the loader's history (read-only; it is
        checkpointed in the loader state and defines the sample stream)."""
        return self.loader.weight_history

    # ------------------------------------------------------------------ the LM head (user API)
    def lm_head_loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     domain_ids: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None, *,
                     num_items_in_batch: int | torch.Tensor | None = None, record: bool = True) -> torch.Tensor:
        """The LM head's cross-entropy through megamix's fused kernel, recording the statistics
        (:meth:`megamix.lm_head.LMHeadDriver.lm_head_loss`)."""
        return self.head.lm_head_loss(hidden, weight, labels, domain_ids, sample_ids,
                                      num_items_in_batch=num_items_in_batch, record=record)

    def loss_and_stats(self, hidden: torch.Tensor, weight: torch.Tensor, batch) -> torch.Tensor:
        """``lm_head_loss`` for a loader :class:`~megamix.loader.Batch` (labels, domain and sample ids)."""
        return self.head.loss_and_stats(hidden, weight, batch)

    # ------------------------------------------------------------------ updates
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
        changed = self.loader.changes(new)     # the one "changed" rule: the sampler's quantised comparison
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
        if self.cfg.mixing.eval_grad_batches > 0 and self.head.collecting:
            if hidden_fn is None or lm_head_weight is None:
                raise ValueError("mixing.eval_grad_batches > 0: Mixer.step needs hidden_fn and lm_head_weight")
            snap.eval_sums, eval_counts = self.head.eval_gradients(hidden_fn, lm_head_weight)
            snap.extra["eval_counts"] = eval_counts
        self.strategy.observe(snap)
        new = np.asarray(self.strategy.propose(step + 1, self.weights), dtype=np.float64)  # drift bound included
        if dist_on:
            # Rule (see megamix.loader.sampler): the group's first rank decides, everyone takes its weights (and
            # DoGraph's cluster table), in one broadcast from that rank (megamix.comm: group_src, not global 0).
            new = self._broadcast_decision(new, self.group)
        info = self.strategy.last_info or {}
        log = {k: info[k] for k in ("cluster_weights", "cluster_shares", "cluster_sizes", "fallback") if k in info}
        return snap, new, log

    def _broadcast_decision(self, new: np.ndarray, group: Any, from_rank: int = 0) -> np.ndarray:
        """Group rank ``from_rank``'s weights on every rank of ``group``, bit for bit, and the gradient reweighter's
        table too when there is one: one buffer, one broadcast."""
        if self.reweighter is None:
            return np.asarray(broadcast_weights(new, group, check=False, from_rank=from_rank), dtype=np.float64)
        D = len(self.domains)
        buf = broadcast_weights(np.concatenate([np.asarray(new, np.float64), self.reweighter.table_buffer(self.k)]),
                                group, check=False, from_rank=from_rank)
        self.reweighter.load_table_buffer(buf[D:], self.k)
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
            raise ConfigError(f"checkpoint was made with domains {sd['domains']}, this run has "
                              f"{self.domains}; use the same data.domains to resume")
        if sd.get("projection_seed") != self.cfg.projection.seed:
            raise ConfigError("checkpoint used projection.seed="
                              f"{sd.get('projection_seed')}, config has {self.cfg.projection.seed}")
        self.loader.load_state_dict(sd["loader"])
        self.strategy.load_state_dict(sd["strategy"])
        self.stats.load_state_dict(sd["stats"])

"""The megamix run configuration: one dataclass section per subsystem.

YAML files in ``configs/`` fill these; ``--set section.key=value`` overrides single fields.
``megamix config --explain`` prints every field with its documentation.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamix import simplex
from megamix.configbase import ConfigBase, ConfigError, check, doc

MIX_KINDS = ("natural", "uniform", "temperature", "explicit", "file")


@dataclass
class DataConfig(ConfigBase):
    """Where the corpus and its token store live, and how the default corpus is built."""

    data_dir: str = doc("Root folder for corpus/, tokens/ and the package cache.", "data")
    domains: list[str] = doc("Domains to train on (empty = every domain in the token store).",
                             default_factory=list)
    cap_mb: float = doc("Per-domain size cap in MB of raw text when building the default corpus.", 2.0)
    valid_fraction: float = doc("Fraction of each domain's documents held out for validation.", 0.05)
    seed: int = doc("Seed for the train/validation split and document sampling.", 1234)
    eval_data_dir: str = doc("Evaluate on this data_dir's domains instead of the training ones (e.g. "
                             "train on regrouped clusters, evaluate on the original domains). "
                             "Empty = same as data_dir.", "")

    def validate(self):
        check(self.cap_mb > 0, f"data.cap_mb must be > 0 (got {self.cap_mb}); e.g. data.cap_mb=2")
        check(0 < self.valid_fraction < 0.5,
              f"data.valid_fraction must be in (0, 0.5) (got {self.valid_fraction})")
        return self


@dataclass
class ModelConfig(ConfigBase):
    """A GPT-2 style decoder (transformers GPT2LMHeadModel, random init)."""

    n_layer: int = doc("Number of transformer blocks.", 2)
    n_embd: int = doc("Hidden size d.", 128)
    n_head: int = doc("Attention heads (must divide n_embd).", 4)
    seq_len: int = doc("Training sequence length in tokens.", 128)
    vocab_size: int = doc("Vocabulary size; 50257 is GPT-2's BPE.", 50257)
    tie_embeddings: bool = doc("Tie the LM head to the token embedding (GPT-2 default).", True)
    dropout: float = doc("Dropout probability.", 0.0)

    def validate(self):
        check(self.n_layer >= 1, "model.n_layer must be >= 1")
        check(self.n_embd % self.n_head == 0,
              f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        check(self.seq_len >= 8, "model.seq_len must be >= 8")
        check(self.vocab_size >= 256, "model.vocab_size must be >= 256")
        return self


@dataclass
class TrainConfig(ConfigBase):
    """Optimisation loop settings."""

    steps: int = doc("Optimizer steps to run.", 200)
    global_batch_size: int = doc("Sequences per optimizer step, summed over ranks and micro-steps.", 16)
    micro_batch_size: int = doc("Sequences per forward/backward on one rank.", 16)
    lr: float = doc("Peak learning rate (AdamW).", 3e-3)
    min_lr_ratio: float = doc("Final LR as a fraction of lr (cosine decay).", 0.1)
    warmup_steps: int = doc("Linear warm-up steps.", 20)
    weight_decay: float = doc("AdamW weight decay.", 0.1)
    grad_clip: float = doc("Gradient-norm clip (0 disables).", 1.0)
    dtype: str = doc("Compute dtype: fp32 or bf16 (autocast).", "fp32")
    seed: int = doc("Seed for model init and the sample stream.", 0)
    eval_every: int = doc("Evaluate per-domain validation loss every N steps (0 = only at the end).", 50)
    eval_batches: int = doc("Validation batches per domain per evaluation.", 4)
    log_every: int = doc("Log training metrics every N steps.", 10)
    checkpoint_every: int = doc("Save a checkpoint every N steps (0 = only at the end).", 0)
    out_dir: str = doc("Run directory: checkpoints, metrics.jsonl, TensorBoard, plots.", "runs/tiny-cpu")
    resume: bool = doc("Resume from the latest checkpoint in out_dir if one exists.", True)
    threads: int = doc("torch CPU threads (0 = torch default).", 0)
    device: str = doc("auto (CUDA when available, else CPU) | cpu | cuda | cuda:N.", "auto")
    loss_impl: str = doc("LM-head loss and statistics path: 'fused' (megamix's chunked linear-CE kernel through "
                         "the Hugging Face patch; no [B,T,V] logits; emits the projections), 'capture' (the "
                         "model's own logits + cross-entropy, statistics read by a backward hook) or 'torch' "
                         "(the model's own logits + cross-entropy, no statistics: static mixing only).", "fused")
    keep_checkpoints: int = doc("Keep the newest N complete checkpoints; older complete ones are deleted only after a "
                                "newer one is complete, and the one `latest` names never is (0 = keep all). The "
                                "default 3 leaves two fallbacks should the newest turn out unreadable, at 3x the "
                                "size of one checkpoint on disk.", 3)
    on_nonfinite: str = doc("A step whose loss (or gradient norm) is NaN/Inf: 'stop' exits (code 2) naming the "
                            "step, before the optimizer applies it, so nothing non-finite is trained on or saved; "
                            "'skip' drops the step (no optimizer step, its statistics are not shown to the mixing "
                            "strategy), logs it (a 'nonfinite' record in metrics.jsonl) and goes on, but still stops "
                            "after 10 consecutive skipped steps. Every rank takes the same decision.", "stop")
    resume_allow_changes: list[str] = doc("Fields that may differ from the checkpoint's config when resuming, e.g. "
                                          "[train.lr, mixing.update_every]. Without them a changed field stops the "
                                          "resume with a diff. Cadence fields and train.steps never need listing "
                                          "(RESUME_FREE in megamix/config.py); fields that shape the saved state "
                                          "(model.*, mixture.*, mixing.strategy, data.domains, projection sizes, "
                                          "seeds, global batch, dtype, ZeRO stage: RESUME_NEVER) cannot be listed: "
                                          "start a new train.out_dir instead.", default_factory=list)

    def validate(self):
        check(self.steps >= 1, "train.steps must be >= 1")
        check(self.global_batch_size % self.micro_batch_size == 0,
              f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
              f"train.micro_batch_size ({self.micro_batch_size})")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.dtype in ("fp32", "bf16"), f"train.dtype must be fp32 or bf16 (got {self.dtype!r})")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
              f"train.device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        check(self.loss_impl in ("fused", "capture", "torch"),
              f"train.loss_impl must be 'fused', 'capture' or 'torch' (got {self.loss_impl!r})")
        check(self.keep_checkpoints >= 0,
              f"train.keep_checkpoints must be >= 0 (0 = keep all; got {self.keep_checkpoints})")
        check(self.on_nonfinite in ("skip", "stop"),
              f"train.on_nonfinite must be 'skip' or 'stop' (got {self.on_nonfinite!r})")
        return self


@dataclass
class MixtureConfig(ConfigBase):
    """The starting (or static) mixture over domains."""

    kind: str = doc("natural (by tokens) | uniform | temperature | explicit | file.", "natural")
    temperature: float = doc("For kind=temperature: weights ∝ tokens^(1/temperature).", 2.0)
    weights: dict[str, float] = doc("For kind=explicit: domain -> weight (must sum to 1).",
                                    default_factory=dict)
    file: str = doc("For kind=file: a mixture JSON (e.g. written by `megamix d2v da2`).", "")

    def validate(self):
        check(self.kind in MIX_KINDS, f"mixture.kind must be one of {MIX_KINDS} (got {self.kind!r})")
        if self.kind == "temperature":
            check(self.temperature > 0, "mixture.temperature must be > 0")
        if self.kind == "explicit":
            check(len(self.weights) > 0, "mixture.kind=explicit needs mixture.weights "
                                         "(e.g. --set 'mixture.weights={code_python: 0.5, legal: 0.5}')")
            try:
                simplex.validate(list(self.weights.values()), names=list(self.weights))
            except ValueError as e:
                raise ConfigError(f"mixture.{e}; normalise them or use mixture.kind=temperature/uniform") from None
        if self.kind == "file":
            check(bool(self.file), "mixture.kind=file needs mixture.file=<path to mixture json>")
        return self


@dataclass
class ProjectionConfig(ConfigBase):
    """Random factored projection of per-sample LM-head gradients: g = P1 G P2ᵀ."""

    enabled: bool = doc("Compute projected per-sample LM-head gradients during training.", True)
    k1: int = doc("Vocab-side projection rows (P1 is k1×V).", 32)
    k2: int = doc("Hidden-side projection rows (P2 is k2×d).", 16)
    kind: str = doc("rademacher or gaussian.", "rademacher")
    seed: int = doc("Projection seed (identical on every rank).", 20260101)
    chunk_tokens: int = doc("Tokens per chunk in the fused linear cross-entropy.", 4096)
    k: int = doc("Optional dense second stage: compress each k1*k2 per-sample row to k dims "
                 "(0 = off, rows stay k1*k2).", 0)
    backend: str = doc("Kernel backend: auto (triton on CUDA, else torch) | torch | triton.", "auto")

    def validate(self):
        check(self.k1 >= 1 and self.k2 >= 1, "projection.k1 and projection.k2 must be >= 1")
        check(self.kind in ("rademacher", "gaussian"),
              f"projection.kind must be rademacher or gaussian (got {self.kind!r})")
        check(self.chunk_tokens >= 1, f"projection.chunk_tokens must be >= 1 (got {self.chunk_tokens})")
        check(self.k >= 0, f"projection.k must be >= 0 (0 disables the second stage; got {self.k})")
        check(self.backend in ("auto", "torch", "triton"),
              f"projection.backend must be auto, torch or triton (got {self.backend!r})")
        return self


@dataclass
class MixingConfig(ConfigBase):
    """Online mixing strategy: which one, how often, and its guards."""

    strategy: str = doc("static | rnb | dograph (see `megamix mix --list`).", "static")
    update_every: int = doc("K: propose new weights every K optimizer steps.", 10)
    rnb_lambda: float = doc("R&B temperature λ in softmax(λ·Gp/‖Gp‖).", 1.0)
    min_weight: float = doc("Floor applied to every domain weight after an update.", 0.01)
    ema: float = doc("EMA smoothing of weights: p ← ema·p_old + (1-ema)·p_new (0 = none).", 0.0)
    dograph_objective: str = doc("DoGraph objective: variance | robust | alignment | uncertainty.",
                                 "variance")
    dograph_clusters: int = doc("DoGraph: k for k-means in projected-gradient space (0 = number of "
                                "domains).", 0)
    min_count: int = doc("Guard: a domain with fewer samples than this in a round keeps its previous "
                         "weight (its statistics are too noisy).", 1)
    rnb_use_eval: bool = doc("R&B: align train-domain gradients with held-out eval gradients "
                             "(snapshot.eval_sums) when present, as in the paper.", True)
    rnb_normalize: bool = doc("R&B: divide Gp by ‖Gp‖ before the softmax (paper default).", True)
    dograph_tau: float = doc("DoGraph temperature for the robust (softmax) and alignment objectives.", 1.0)
    dograph_beta: float = doc("DoGraph variance objective: weight of the global-descent-direction term.",
                              1.0)
    dograph_iters: int = doc("DoGraph: max solver / fixed-point iterations.", 200)
    dograph_cosine: bool = doc("DoGraph: cluster L2-normalised per-sample gradients (directions only). "
                               "Default on: raw-gradient k-means splits by magnitude and was unstable "
                               "under the factored projection (tests/test_strategies_exact.py).", True)
    seed: int = doc("Seed of the strategies' deterministic k-means (identical on every rank).", 0)
    eval_grad_batches: int = doc("Held-out gradient for R&B: validation batches per domain whose projected "
                                 "gradients are computed at each update and used as the target "
                                 "(snapshot.eval_sums). 0 = off (the training mixture's gradient is the "
                                 "target). Costs one no-grad LM forward per batch per update.", 0)
    options: dict[str, float] = doc("Extra strategy-specific numeric options.", default_factory=dict)

    def validate(self):
        check(self.update_every >= 1, "mixing.update_every must be >= 1")
        check(0 <= self.min_weight < 1, "mixing.min_weight must be in [0, 1)")
        check(0 <= self.ema < 1, "mixing.ema must be in [0, 1)")
        check(self.strategy in ("static", "rnb", "dograph"),
              f"mixing.strategy must be static, rnb or dograph (got {self.strategy!r}); "
              "see `megamix mix --list`")
        check(self.dograph_objective in ("variance", "robust", "alignment", "uncertainty"),
              "mixing.dograph_objective must be variance, robust, alignment or uncertainty "
              f"(got {self.dograph_objective!r})")
        check(self.rnb_lambda > 0, f"mixing.rnb_lambda must be > 0 (got {self.rnb_lambda})")
        check(self.min_count >= 0, "mixing.min_count must be >= 0")
        check(self.dograph_clusters >= 0, "mixing.dograph_clusters must be >= 0 (0 = number of domains)")
        check(self.dograph_tau > 0, "mixing.dograph_tau must be > 0")
        check(self.dograph_beta >= 0, "mixing.dograph_beta must be >= 0")
        check(self.dograph_iters >= 1, "mixing.dograph_iters must be >= 1")
        return self


@dataclass
class LoaderConfig(ConfigBase):
    """The online weighted loader (megamix.loader): repetition cap, telemetry, debug checks."""

    max_epochs: int = doc("Stop with a clear error when a domain would start epoch max_epochs+1 "
                          "(0 = unlimited: reshuffle and repeat).", 0)
    telemetry_window: int = doc("Steps in the 'last window' realised-share telemetry.", 100)
    verify_weights: bool = doc("Debug: all-reduce a checksum to prove every rank holds the same weights "
                               "after each update.", False)
    history_limit: int = doc("Keep at most this many weight-history entries in checkpoints (0 = all).", 0)

    def validate(self):
        check(self.max_epochs >= 0, "loader.max_epochs must be >= 0 (0 = unlimited)")
        check(self.telemetry_window >= 1, "loader.telemetry_window must be >= 1")
        check(self.history_limit >= 0, "loader.history_limit must be >= 0")
        return self


@dataclass
class DeepSpeedConfig(ConfigBase):
    """Running the pretraining through DeepSpeed (megamix.integrations.deepspeed)."""

    enabled: bool = doc("Train through a DeepSpeed engine instead of the plain single-process loop.", False)
    zero_stage: int = doc("ZeRO stage 0-3.", 1)
    backend: str = doc("torch.distributed backend: gloo (CPU) or nccl (GPU).", "gloo")
    skip_op_builds: bool = doc("Avoid DeepSpeed's run-time C++ op builds (shm comm, fused Adam) on CPU.",
                               True)
    offload_optimizer: bool = doc("ZeRO-Offload: keep optimizer states on the CPU (needs zero_stage >= 1; "
                                  "JIT-builds DeepSpeed's cpu_adam op once).", False)

    def validate(self):
        check(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3 (got {self.zero_stage})")
        check(self.backend in ("gloo", "nccl"), f"deepspeed.backend must be gloo or nccl (got {self.backend!r})")
        return self


@dataclass
class MegamixConfig(ConfigBase):
    """A full megamix run."""

    data: DataConfig = doc("Corpus and token store.", default_factory=DataConfig)
    model: ModelConfig = doc("The GPT model.", default_factory=ModelConfig)
    train: TrainConfig = doc("Optimisation.", default_factory=TrainConfig)
    mixture: MixtureConfig = doc("Starting / static mixture.", default_factory=MixtureConfig)
    projection: ProjectionConfig = doc("Per-sample gradient projection.", default_factory=ProjectionConfig)
    mixing: MixingConfig = doc("Online mixing strategy.", default_factory=MixingConfig)
    loader: LoaderConfig = doc("Online weighted loader.", default_factory=LoaderConfig)
    deepspeed: DeepSpeedConfig = doc("DeepSpeed engine settings.", default_factory=DeepSpeedConfig)

    def validate(self):
        super().validate()
        if self.mixing.strategy != "static" and self.train.loss_impl == "torch":
            raise ConfigError(f"mixing.strategy={self.mixing.strategy} needs gradient statistics, which "
                              "train.loss_impl=torch does not collect: set train.loss_impl=fused (or capture)")
        if self.mixing.strategy != "static" and not self.projection.enabled:
            raise ConfigError(f"mixing.strategy={self.mixing.strategy} needs gradient statistics: "
                              "set projection.enabled=true")
        keys = set(flat_config(self.to_dict()))
        for key in self.train.resume_allow_changes:
            check(key in keys, f"train.resume_allow_changes: unknown config key {key!r} (use section.field, e.g. "
                               "train.lr)")
            check(resume_change_kind(key) != "never",
                  f"train.resume_allow_changes: {key} cannot change on resume (the checkpoint's state depends on "
                  "it); start a new train.out_dir instead")
        return self


# ------------------------------------------------------------------------------------ resume compatibility
#: Fields a resume may change freely: where and how often things are logged, evaluated and saved, where the
#: run executes, and train.steps (extending or shortening a run; the cosine LR schedule then spans the new
#: length, and the loop says so).
RESUME_FREE = frozenset({
    "train.out_dir", "train.resume", "train.threads", "train.device", "train.steps", "train.eval_every",
    "train.eval_batches", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.on_nonfinite", "train.resume_allow_changes", "data.cap_mb", "data.valid_fraction", "data.seed",
    "data.eval_data_dir", "loader.telemetry_window", "loader.verify_weights", "deepspeed.backend",
    "deepspeed.skip_op_builds"})
#: Fields (or ``section.`` prefixes) a resume can never change: the saved tensors, the sample stream or the
#: strategy's state depend on them. Every other field may change when listed in train.resume_allow_changes.
RESUME_NEVER = frozenset({
    "model.", "mixture.", "mixing.strategy", "data.domains", "projection.enabled", "projection.k1",
    "projection.k2", "projection.k", "projection.kind", "projection.seed", "train.seed", "train.global_batch_size",
    "train.dtype", "deepspeed.enabled", "deepspeed.zero_stage", "deepspeed.offload_optimizer"})


def flat_config(d: dict) -> dict:
    """``{"section.field": value}`` of a :meth:`MegamixConfig.to_dict` (one level of sections)."""
    out = {}
    for section, fields in d.items():
        if isinstance(fields, dict):
            for name, value in fields.items():
                out[f"{section}.{name}"] = value
        else:
            out[section] = fields
    return out


def resume_change_kind(key: str) -> str:
    """``free`` | ``never`` | ``override`` (may change when listed in train.resume_allow_changes)."""
    if key in RESUME_FREE:
        return "free"
    if key in RESUME_NEVER or any(p.endswith(".") and key.startswith(p) for p in RESUME_NEVER):
        return "never"
    return "override"


__all__ = ["ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "MixtureConfig",
           "ProjectionConfig", "MixingConfig", "LoaderConfig", "DeepSpeedConfig", "MegamixConfig", "RESUME_FREE",
           "RESUME_NEVER", "flat_config", "resume_change_kind"]

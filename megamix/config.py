"""The megamix run configuration: one dataclass section per subsystem.

YAML files in ``configs/`` fill these; ``--set section.key=value`` overrides single fields.
``megamix config --explain`` prints every field with its documentation.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from megamix import simplex
from megamix.configbase import ConfigBase, ConfigError, check, doc
from megamix.data.backings import parse_paths

MIX_KINDS = ("natural", "uniform", "temperature", "explicit", "file")
#: the names megamix.strategies.STRATEGIES registers (a test keeps the two in step; config sits below
#: strategies in the layering, so it cannot import the registry)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: megamix.kernels.fused_linear_ce.U_METHODS (kept in step by a test, as above)
U_METHODS = ("fused", "gemm", "augmented", "tiled")
OPTIMIZERS = ("auto", "adamw", "fused_adam", "apex_fused_adam")


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
    tokenizer: str = doc("Tokenizer: 'gpt2' (GPT-2 BPE, bundled offline), a local tokenizer folder, or a Hugging "
                         "Face name in the local cache. `megamix data build/tokenize/import` encode with it (empty "
                         "= the tokenizer data_dir/tokens already records, else gpt2); with data.paths it names "
                         "the tokenizer the in-place data was made with (empty = unknown: ids are checked against "
                         "model.vocab_size only).", "")
    paths: Any = doc("Train on existing token files in place (no copy) instead of data_dir/tokens: a Megatron "
                     "blend [w1, prefix1, w2, prefix2, ...] (weights normalised, used as the natural mixture), a "
                     "list of prefixes, or a mapping {domain: prefix | [prefixes]}. A prefix names a .bin/.idx "
                     "pair; a folder is a Hugging Face save_to_disk dataset with an input_ids column.",
                     default_factory=list)
    valid_paths: Any = doc("Validation data for data.paths, same forms; domain names must match data.paths. "
                           "Domains without one use a DatasetDict's own validation split, else a seeded "
                           "held-out split of data.valid_fraction of the documents (nothing is rewritten).",
                           default_factory=list)
    vocab_check_mb: float = doc("In-place data: MB of each source read to find its largest token id (checked "
                                "against the vocabularies): whole files up to this size, else evenly spaced "
                                "blocks; -1 = read every file whole.", 64.0)

    def validate(self):
        check(self.cap_mb > 0, f"data.cap_mb must be > 0 (got {self.cap_mb}); e.g. data.cap_mb=2")
        check(0 < self.valid_fraction < 0.5,
              f"data.valid_fraction must be in (0, 0.5) (got {self.valid_fraction})")
        check(self.vocab_check_mb == -1 or self.vocab_check_mb > 0,
              f"data.vocab_check_mb must be > 0, or -1 to read whole files (got {self.vocab_check_mb})")
        parse_paths(self.paths, "data.paths")          # the form only; files are checked when opened
        parse_paths(self.valid_paths, "data.valid_paths")
        check(bool(self.paths) or not self.valid_paths, "data.valid_paths needs data.paths (a megamix store "
                                                        "in data_dir has its own validation split)")
        return self


@dataclass
class ModelConfig(ConfigBase):
    """The model: a GPT-2 style decoder by default, or any Hugging Face causal LM (model.hf_config)."""

    n_layer: int = doc("GPT-2 only (ignored when model.hf_config is set): number of transformer blocks.", 2)
    n_embd: int = doc("GPT-2 only (ignored when model.hf_config is set): hidden size d.", 128)
    n_head: int = doc("GPT-2 only (ignored when model.hf_config is set): attention heads (must divide n_embd).", 4)
    seq_len: int = doc("Training sequence length in tokens.", 128)
    vocab_size: int | str = doc(
        "Vocabulary size of the model. auto (default): the HF config's vocab_size (model.hf_config), else the "
        "tokenizer's (recorded in the token store), else the store's largest token id + 1 (in-place data without a "
        "tokenizer); GPT-2 built without data: 50257 (GPT-2's BPE). An explicit value must equal the HF config's and "
        "be at least the data's (a larger one pads the vocabulary); a disagreement is a one-line error naming both.",
        "auto")
    tie_embeddings: bool = doc("GPT-2 only (with model.hf_config, tie_word_embeddings of the HF config decides): "
                               "tie the LM head to the token embedding.", True)
    dropout: float = doc("GPT-2 only (ignored when model.hf_config is set): dropout probability.", 0.0)
    hf_config: str | dict[str, Any] = doc(
        "Any Hugging Face causal LM instead of the built-in GPT-2 (empty = GPT-2 from the fields above): a local "
        "folder with config.json, an HF config name found in the local Hugging Face cache (runs are offline), "
        "or an inline architecture, e.g. {model_type: llama, hidden_size: 768, num_hidden_layers: 12, "
        "num_attention_heads: 12, intermediate_size: 2048}. Built with random init (seeded by train.seed).", "")
    init_from: str = doc("Start from these weights instead of random init: a Hugging Face save_pretrained folder, "
                         "a megamix checkpoint folder (checkpoints/step_XXXXXXX) or its model.pt. The shapes must "
                         "match the model built from this section. Empty = random init.", "")
    attn_implementation: str = doc("Attention kernel: sdpa (default; torch scaled_dot_product_attention), eager, "
                                   "or flash_attention_2 (CUDA and the flash-attn package only).", "sdpa")
    doc_masking: bool = doc("Block-diagonal causal attention inside packed windows: a token attends only to "
                            "earlier tokens of its own document (from the loader's segment_ids). false = the whole "
                            "window attends causally across document boundaries.", True)
    gradient_checkpointing: bool = doc("Recompute activations in the backward pass (less memory, ~30% more "
                                       "compute).", False)
    compile: bool = doc("torch.compile the model body (the transformer blocks; the LM head and loss stay eager, "
                        "so the fused head still applies). The first steps are slow while it compiles.", False)

    def validate(self):
        check(self.seq_len >= 8, "model.seq_len must be >= 8")
        check(self.vocab_size == "auto" or (isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool)
                                            and self.vocab_size >= 256),
              f"model.vocab_size must be auto or an integer >= 256 (got {self.vocab_size!r})")
        check(self.attn_implementation in ATTN_IMPLEMENTATIONS,
              f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)} "
              f"(got {self.attn_implementation!r})")
        if isinstance(self.hf_config, dict):
            check(isinstance(self.hf_config.get("model_type"), str) and self.hf_config["model_type"],
                  "model.hf_config as an inline architecture needs model_type, e.g. "
                  "{model_type: llama, hidden_size: 768, num_hidden_layers: 12, ...}")
        if self.hf_config in ("", {}):
            check(self.n_layer >= 1, "model.n_layer must be >= 1")
            check(self.n_head >= 1, f"model.n_head must be >= 1 (got {self.n_head})")
            check(self.n_embd % self.n_head == 0,
                  f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
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
    optimizer: str = doc("auto (torch AdamW; DeepSpeed's CPU Adam under ZeRO-Offload; the ds_config's own when "
                         "deepspeed.config has an optimizer section) | adamw (torch.optim.AdamW) | fused_adam "
                         "(DeepSpeed's FusedAdam, CUDA) | apex_fused_adam (NVIDIA apex's FusedAdam, CUDA).", "auto")
    keep_checkpoints: int = doc("Keep the newest N complete checkpoints; older complete ones are deleted only after a "
                                "newer one is complete, and the one `latest` names never is (0 = keep all). The "
                                "default 3 leaves two fallbacks should the newest turn out unreadable, at 3x the "
                                "size of one checkpoint on disk.", 3)
    on_nonfinite: str = doc("A step whose loss (or gradient norm) is NaN/Inf: 'stop' exits (code 2) naming the "
                            "step, before the optimizer applies it, so nothing non-finite is trained on or saved; "
                            "'skip' drops the step (no optimizer step, its statistics are not shown to the mixing "
                            "strategy), logs it (a 'nonfinite' record in metrics.jsonl) and goes on, but still stops "
                            "after 10 consecutive skipped steps. Every rank takes the same decision. Under DeepSpeed only the loss "
                            "is checked (the gradients are not; no checkpoint holds non-finite parameters).", "stop")
    resume_allow_changes: list[str] = doc("Fields that may differ from the checkpoint's config when resuming, e.g. "
                                          "[train.lr, mixing.update_every]. Without them a changed field stops the "
                                          "resume with a diff. Cadence fields and train.steps never need listing "
                                          "(RESUME_FREE in megamix/config.py); fields that shape the saved state "
                                          "(model.*, mixture.*, mixing.strategy, data.domains, projection sizes, "
                                          "seeds, global batch, dtype, ZeRO stage: RESUME_NEVER) cannot be listed: "
                                          "start a new train.out_dir instead.", default_factory=list)

    def validate(self):
        check(self.steps >= 1, "train.steps must be >= 1")
        for name in ("global_batch_size", "micro_batch_size", "log_every", "eval_batches"):
            check(getattr(self, name) >= 1, f"train.{name} must be >= 1 (got {getattr(self, name)})")
        for name, zero in (("eval_every", "only at the end"), ("checkpoint_every", "only at the end"),
                           ("warmup_steps", "no warm-up"), ("threads", "torch's default")):
            check(getattr(self, name) >= 0, f"train.{name} must be >= 0 (got {getattr(self, name)}; "
                                            f"0 = {zero})")
        check(bool(self.out_dir.strip()), "train.out_dir is empty; set it to the run's folder, e.g. "
                                          "train.out_dir=runs/my-run")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio}); "
                                           "it is the final LR as a fraction of train.lr")
        check(self.global_batch_size % self.micro_batch_size == 0,
              f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
              f"train.micro_batch_size ({self.micro_batch_size})")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.dtype in ("fp32", "bf16"), f"train.dtype must be fp32 or bf16 (got {self.dtype!r})")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
              f"train.device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        check(self.loss_impl in ("fused", "capture", "torch"),
              f"train.loss_impl must be 'fused', 'capture' or 'torch' (got {self.loss_impl!r})")
        check(self.optimizer in OPTIMIZERS,
              f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
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
    k1: int = doc("Vocab-side projection rows (P1 is k1×V). At most 512 when a Triton kernel has k1 as a tile "
                  "dimension (u_method fused or tiled, backend auto/triton): the most that fits the GPU shared memory "
                  "of an A100, H100/H200 and B200 with fp32 logits (kernels/README.md).", 32)
    k2: int = doc("Hidden-side projection rows (P2 is k2×d).", 16)
    kind: str = doc("rademacher or gaussian.", "rademacher")
    seed: int = doc("Projection seed (identical on every rank).", 20260101)
    chunk_tokens: int = doc("Tokens per chunk in the fused linear cross-entropy.", 4096)
    k: int = doc("Optional dense second stage: compress each k1*k2 per-sample row to k dims "
                 "(0 = off, rows stay k1*k2).", 0)
    backend: str = doc("Kernel backend: auto (triton on CUDA, else torch) | torch | triton.", "auto")
    u_method: str = doc("Where the fused loss computes u = δ P1ᵀ: fused (inside the CE pass, default) | gemm (one "
                        "more GEMM per δ chunk) | augmented (extra columns of the dX GEMM, δ [W | P1ᵀ]; one extra "
                        "copy of W in memory) | tiled (a 128-row-tile Triton kernel; CUDA/Triton only). δ, the "
                        "loss and dW are bit-identical for all four; see kernels/bench/results/SUMMARY.md.", "fused")

    def validate(self):
        check(self.k1 >= 1 and self.k2 >= 1, "projection.k1 and projection.k2 must be >= 1")
        check(self.kind in ("rademacher", "gaussian"),
              f"projection.kind must be rademacher or gaussian (got {self.kind!r})")
        check(self.chunk_tokens >= 1, f"projection.chunk_tokens must be >= 1 (got {self.chunk_tokens})")
        check(self.k >= 0, f"projection.k must be >= 0 (0 disables the second stage; got {self.k})")
        check(self.backend in ("auto", "torch", "triton"),
              f"projection.backend must be auto, torch or triton (got {self.backend!r})")
        check(self.u_method in U_METHODS,
              f"projection.u_method must be one of {', '.join(U_METHODS)} (got {self.u_method!r})")
        check(not (self.u_method == "tiled" and self.backend == "torch"),
              "projection.u_method=tiled is a Triton kernel but projection.backend=torch: set projection.u_method=gemm "
              "or projection.backend=auto on a CUDA machine")
        # The Triton kernels with k1 as a tile dimension (u_method fused: the CE pass; tiled: the projection kernel)
        # fit every supported GPU's shared memory up to megamix.kernels.launch_configs.max_k1(): 512 with fp32 logits,
        # 1024 with bf16/fp16. This section does not know the logits dtype, so it holds the smaller one. The numbers
        # (KB needed at the smallest tile, on an A100) are launch_configs.REFUSED["fp32"]; config sits below kernels
        # in the layering, so they are mirrored here and tests/test_kernels_compile.py checks them against compiles.
        k1_max, need_kb = 512, {"fused": (264, "fused CE"), "tiled": (260, "tiled projection")}
        if self.backend != "torch" and self.u_method in need_kb and self.k1 > k1_max:
            kb, kernel = need_kb[self.u_method]
            check(False, f"projection.k1={self.k1} needs at least {kb} KB of GPU shared memory per block in the "
                         f"{kernel} kernel (fp32 logits, its smallest tile), above the A100's 163 KB; the largest k1 "
                         f"that fits every supported GPU is {k1_max} (projection.u_method=gemm has no such limit)")
        return self


@dataclass
class MixingConfig(ConfigBase):
    """Online mixing strategy: which one, how often, and its guards."""

    strategy: str = doc("static | rnb | rnb-damped | dograph | dograph-sample (see `megamix mix --list`). `rnb` is "
                        "R&B as the paper runs it (no EMA, no floor); `rnb-damped` adds EMA 0.5 and a 0.02 floor. "
                        "`dograph` reweights each sample's gradient by its cluster's weight (the paper); "
                        "`dograph-sample` turns the cluster weights into domain sampling weights instead.", "static")
    update_every: int = doc("K: propose new weights every K optimizer steps.", 10)
    rnb_lambda: float = doc("R&B λ in softmax(λ·Gp/‖Gp‖): a multiplier (inverse temperature), so a larger λ "
                            "sharpens the weights and λ → 0 gives uniform.", 1.0)
    min_weight: float | None = doc("Floor applied to every domain (or DoGraph cluster) weight after an update. "
                                   "null = the strategy's default (rnb: 0, as in the paper; rnb-damped: 0.02; "
                                   "dograph, dograph-sample: 0.01).", None)
    ema: float | None = doc("EMA smoothing of weights: p ← ema·p_old + (1-ema)·p_new (0 = none). null = the "
                            "strategy's default (rnb: 0, as in the paper; rnb-damped: 0.5; dograph: 0).", None)
    dograph_objective: str = doc("DoGraph objective: uncertainty (the paper's best) | variance | robust | "
                                 "alignment.", "uncertainty")
    dograph_clusters: int = doc("DoGraph: m, the number of k-means clusters in projected-gradient space (0 = the "
                                "paper's 11, or the number of domains if smaller).", 0)
    dograph_reservoir: int = doc("DoGraph: per-sample gradient rows kept per round to refresh the clusters, a "
                                 "seeded uniform sample identical on every rank (memory R·(k+5) numbers per rank, "
                                 "communication world·R keys + R·(k+4) numbers per round, whatever the global "
                                 "batch).", 1024)
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

    def validate(self):
        check(self.update_every >= 1, "mixing.update_every must be >= 1")
        check(self.min_weight is None or 0 <= self.min_weight < 1,
              f"mixing.min_weight must be in [0, 1) (got {self.min_weight}); or null for the strategy's default")
        check(self.ema is None or 0 <= self.ema < 1,
              f"mixing.ema must be in [0, 1) (got {self.ema}); or null for the strategy's default")
        check(self.dograph_objective in ("variance", "robust", "alignment", "uncertainty"),
              "mixing.dograph_objective must be variance, robust, alignment or uncertainty "
              f"(got {self.dograph_objective!r})")
        check(self.rnb_lambda > 0, f"mixing.rnb_lambda must be > 0 (got {self.rnb_lambda})")
        check(self.min_count >= 0, "mixing.min_count must be >= 0")
        check(self.dograph_clusters >= 0, "mixing.dograph_clusters must be >= 0 (0 = min(11, number of domains))")
        check(self.dograph_reservoir >= 2, f"mixing.dograph_reservoir must be >= 2 rows (got {self.dograph_reservoir}); "
                                           "e.g. mixing.dograph_reservoir=1024")
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

    enabled: bool = doc("Train through a DeepSpeed engine instead of the plain (one process) or DDP (several processes) backend.", False)
    zero_stage: int = doc("ZeRO stage 0-3.", 1)
    backend: str = doc("torch.distributed backend: gloo (CPU) or nccl (GPU).", "gloo")
    skip_op_builds: bool = doc("Avoid DeepSpeed's run-time C++ op builds (shm comm, fused Adam) on CPU.",
                               True)
    offload_optimizer: bool = doc("ZeRO-Offload: keep optimizer states on the CPU (needs zero_stage >= 1; "
                                  "JIT-builds DeepSpeed's cpu_adam op once).", False)
    config: str = doc("Your own DeepSpeed JSON config (ds_config.json), merged with what megamix sets: batch "
                      "geometry, bf16, ZeRO stage, gradient clipping, and the optimizer and LR schedule unless the "
                      "file has its own. \"auto\" values are filled; a value that contradicts the megamix config is "
                      "an error naming both (nothing is overridden silently). Empty = megamix builds it all.", "")

    def validate(self):
        check(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3 (got {self.zero_stage})")
        check(self.backend in ("gloo", "nccl"), f"deepspeed.backend must be gloo or nccl (got {self.backend!r})")
        check(not self.config or self.enabled,
              f"deepspeed.config={self.config} is set but deepspeed.enabled=false: set deepspeed.enabled=true "
              "(or remove deepspeed.config)")
        return self


@dataclass
class LoggingConfig(ConfigBase):
    """Run telemetry besides metrics.jsonl: TensorBoard, Weights & Biases, statistics snapshots."""

    tensorboard: bool = doc("Mirror the metrics to TensorBoard under out_dir/tensorboard (when installed).", True)
    wandb: bool = doc("Log the metrics and the config to Weights & Biases from rank 0 "
                      "(pip install megamix[wandb]).", False)
    wandb_project: str = doc("W&B project.", "megamix")
    wandb_entity: str = doc("W&B entity (team or user; empty = your default).", "")
    wandb_name: str = doc("W&B run name (empty = the name of train.out_dir).", "")
    wandb_mode: str = doc("W&B mode: online | offline | disabled (empty = wandb's default, which honours "
                          "the WANDB_MODE environment variable).", "")
    wandb_tags: list[str] = doc("W&B run tags.", default_factory=list)
    snapshots: int = doc("Keep the statistics snapshot (.npz) of the newest N mixing rounds under "
                         "out_dir/snapshots, plus latest.npz, for `megamix mix simulate --snapshot` "
                         "(0 = write none).", 10)

    def validate(self):
        check(self.wandb_mode in ("", "online", "offline", "disabled"),
              f"logging.wandb_mode must be online, offline, disabled or empty (got {self.wandb_mode!r})")
        check(self.snapshots >= 0, f"logging.snapshots must be >= 0 (0 = none; got {self.snapshots})")
        if self.wandb:
            check(importlib.util.find_spec("wandb") is not None,
                  "logging.wandb=true but the wandb package is not installed: pip install 'megamix[wandb]' "
                  "(or set logging.wandb=false)")
        return self


@dataclass
class MegamixConfig(ConfigBase):
    """A full megamix run."""

    data: DataConfig = doc("Corpus and token store.", default_factory=DataConfig)
    model: ModelConfig = doc("The model (GPT-2 or any HF causal LM).", default_factory=ModelConfig)
    train: TrainConfig = doc("Optimisation.", default_factory=TrainConfig)
    mixture: MixtureConfig = doc("Starting / static mixture.", default_factory=MixtureConfig)
    projection: ProjectionConfig = doc("Per-sample gradient projection.", default_factory=ProjectionConfig)
    mixing: MixingConfig = doc("Online mixing strategy.", default_factory=MixingConfig)
    loader: LoaderConfig = doc("Online weighted loader.", default_factory=LoaderConfig)
    deepspeed: DeepSpeedConfig = doc("DeepSpeed engine settings.", default_factory=DeepSpeedConfig)
    logging: LoggingConfig = doc("TensorBoard, Weights & Biases, statistics snapshots.", default_factory=LoggingConfig)

    def validate(self):
        super().validate()
        if self.mixing.strategy != "static" and self.train.loss_impl == "torch":
            raise ConfigError(f"mixing.strategy={self.mixing.strategy} needs gradient statistics, which "
                              "train.loss_impl=torch does not collect: set train.loss_impl=fused (or capture)")
        if self.mixing.strategy != "static" and not self.projection.enabled:
            raise ConfigError(f"mixing.strategy={self.mixing.strategy} needs gradient statistics: "
                              "set projection.enabled=true")
        if self.model.compile and self.deepspeed.enabled and self.deepspeed.zero_stage == 3:
            raise ConfigError("model.compile=true with deepspeed.zero_stage=3: DeepSpeed's ZeRO-3 gathers every "
                              "parameter through module hooks, which break torch.compile's graph at each layer; set "
                              "model.compile=false, or use deepspeed.zero_stage 0-2 with model.compile=true")
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
#: run executes, train.steps (extending or shortening a run; the cosine LR schedule then spans the new
#: length), and train.micro_batch_size (the launch geometry, like the world size: the sample stream depends on the
#: global batch only, which may not change).
RESUME_FREE = frozenset({
    "train.out_dir", "train.resume", "train.threads", "train.device", "train.steps", "train.micro_batch_size",
    "train.eval_every",
    "train.eval_batches", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.on_nonfinite", "train.resume_allow_changes", "data.cap_mb",
    "data.eval_data_dir", "data.vocab_check_mb", "loader.telemetry_window", "loader.verify_weights",
    "deepspeed.backend", "deepspeed.skip_op_builds", "model.gradient_checkpointing", "model.compile",
    "model.init_from", "logging."})
#: Exceptions to RESUME_NEVER's prefixes that may change when listed in train.resume_allow_changes (they change
#: the arithmetic, not the saved state).
RESUME_OVERRIDE = frozenset({"model.attn_implementation", "model.doc_masking"})
#: Fields (or ``section.`` prefixes) a resume can never change: the saved tensors, the sample stream or the
#: strategy's state depend on them. Every other field may change when listed in train.resume_allow_changes.
RESUME_NEVER = frozenset({
    "model.", "mixture.", "mixing.strategy", "data.domains", "projection.enabled", "projection.k1",
    "projection.k2", "projection.k", "projection.kind", "projection.seed", "train.seed", "train.global_batch_size",
    "train.dtype", "train.optimizer", "deepspeed.enabled", "deepspeed.zero_stage", "deepspeed.offload_optimizer",
    "data.tokenizer", "data.paths", "data.valid_paths", "data.seed", "data.valid_fraction",
    "mixing.dograph_reservoir", "mixing.dograph_clusters", "deepspeed.config"})


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
    if key in RESUME_FREE or any(p.endswith(".") and key.startswith(p) for p in RESUME_FREE):
        return "free"
    if key in RESUME_OVERRIDE:
        return "override"
    if key in RESUME_NEVER or any(p.endswith(".") and key.startswith(p) for p in RESUME_NEVER):
        return "never"
    return "override"


__all__ = ["ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "MixtureConfig",
           "ProjectionConfig", "MixingConfig", "LoaderConfig", "DeepSpeedConfig", "LoggingConfig", "MegamixConfig",
           "RESUME_FREE", "RESUME_NEVER", "flat_config", "resume_change_kind"]

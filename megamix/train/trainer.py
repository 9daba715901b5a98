"""The single-process pretraining loop (the CPU demo; also the proxy trainer for Domain2Vec+RegMix).

One optimizer step = ``global_batch_size`` sequences drawn by the weighted loader, split into
micro-batches; the loss is megamix's fused linear cross-entropy, which also produces the projected
per-sample LM-head gradients that the mixing strategy consumes every ``mixing.update_every`` steps.
Per-domain validation loss, weights and throughput go to ``metrics.jsonl`` (+ TensorBoard), and a
PNG of the curves is written at the end.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megamix.config import MegamixConfig
from megamix.train.metrics import MetricsLogger
from megamix.train.model import build_model, count_parameters, hidden_states, lm_head_weight


@dataclass
class TrainResult:
    """What a training run returns (also written to ``<out_dir>/result.json``)."""

    out_dir: str
    steps: int
    valid_loss: dict[str, float]
    valid_loss_avg: float
    train_loss: float
    weights: dict[str, float]
    tokens_per_second: float
    wall_seconds: float
    history: list[dict] = field(default_factory=list)
    plot: str | None = None


def lr_at(step: int, cfg: MegamixConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def build_optimizer(model: torch.nn.Module, cfg: MegamixConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases, norms and position embeddings excluded)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: torch.nn.Module, store, domains: list[str], cfg: MegamixConfig,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean validation token loss per domain over ``train.eval_batches`` deterministic batches."""
    from megamix.loader import eval_batches

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for d in domains:
        tot, n = 0.0, 0
        for batch in eval_batches(store, d, seq_len=cfg.model.seq_len,
                                  batch_size=cfg.train.micro_batch_size,
                                  max_batches=cfg.train.eval_batches):
            batch = batch.to(device)
            with _autocast(dtype, device):
                h = hidden_states(model, batch.input_ids, batch.position_ids)
            logits = h.float() @ lm_head_weight(model).float().t()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            tot += float(loss)
            n += int((batch.labels != -100).sum())
        out[d] = tot / n if n else float("nan")
    if was_training:
        model.train()
    return out


def _eval_hidden(model: torch.nn.Module, batch, dtype: torch.dtype | None) -> torch.Tensor:
    """LM-head input for a held-out batch, in eval mode (no dropout), without gradients."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = batch.to(device)
        with torch.no_grad(), _autocast(dtype, device):
            return hidden_states(model, batch.input_ids, batch.position_ids).float()
    finally:
        model.train(was)


def _autocast(dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    kind = torch.device(device).type
    if dtype is None or dtype == torch.float32:
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from megamix.configbase import ConfigError
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def _avg(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint's step (they will be produced again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


class Checkpointer:
    """``<out_dir>/checkpoints/step_XXXXXXX.pt`` plus a ``latest`` pointer file."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "checkpoints"

    def latest(self) -> Path | None:
        ptr = self.dir / "latest"
        if not ptr.exists():
            return None
        p = self.dir / ptr.read_text().strip()
        return p if p.exists() else None

    def save(self, step: int, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        (self.dir / "latest.tmp").write_text(path.name)
        (self.dir / "latest.tmp").replace(self.dir / "latest")
        return path


def train(cfg: MegamixConfig, *, progress: bool = True, log_to_stdout: bool = True) -> TrainResult:
    """Run single-process pretraining as configured; returns per-domain validation losses etc."""
    from tqdm.auto import tqdm

    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    from megamix.train.plots import plot_run

    cfg.validate()
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = TokenStore(Path(cfg.data.data_dir) / "tokens")
    vocab = store.manifest.get("vocab_size", cfg.model.vocab_size)
    if vocab > cfg.model.vocab_size:
        from megamix.configbase import ConfigError
        raise ConfigError(f"token store vocabulary ({vocab}) exceeds model.vocab_size "
                          f"({cfg.model.vocab_size}); set model.vocab_size={vocab}")
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    model = build_model(cfg.model, seed=t.seed).to(device)
    mixer = Mixer(cfg, store)
    opt = build_optimizer(model, cfg)
    dtype = torch.bfloat16 if t.dtype == "bf16" else None
    n_micro = t.global_batch_size // t.micro_batch_size
    ckpt = Checkpointer(out_dir)
    start = 0
    eval_store, eval_domains = store, None
    if cfg.data.eval_data_dir:
        eval_store = TokenStore(Path(cfg.data.eval_data_dir) / "tokens")
        eval_domains = list(eval_store.domains)
    if t.resume and ckpt.latest() is not None:
        state = torch.load(ckpt.latest(), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        mixer.load_state_dict(state["mixer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start = state["step"]
        _truncate_metrics(out_dir / "metrics.jsonl", start)
        if log_to_stdout:
            print(f"resumed from {ckpt.latest()} at step {start}")
    if start == 0 and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()  # a fresh run: drop records of an earlier, unfinished one
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    logger = MetricsLogger(out_dir)
    if start == 0:
        logger.log("run", 0, params=count_parameters(model), domains=mixer.domains,
                   tokens_per_step=t.global_batch_size * cfg.model.seq_len)
        logger.log("weights", 0, weights=dict(zip(mixer.domains, mixer.weights.tolist())))
    if log_to_stdout:
        pc = count_parameters(model)
        print(f"model: {pc['total'] / 1e6:.2f}M params ({pc['non_embedding'] / 1e6:.2f}M non-embedding); "
              f"{len(mixer.domains)} domains; strategy={cfg.mixing.strategy}; "
              f"{t.global_batch_size}x{cfg.model.seq_len} tokens/step")

    model.train()
    tokens_per_step = t.global_batch_size * cfg.model.seq_len
    step_times: list[float] = []
    last_loss = float("nan")
    t0 = time.time()
    bar = tqdm(range(start, t.steps), desc="train", disable=not progress, initial=start, total=t.steps)
    for step in bar:
        ts = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss_acc = 0.0
        for batch in mixer.next_step():
            batch = batch.to(device)
            with _autocast(dtype, device):
                h = hidden_states(model, batch.input_ids, batch.position_ids)
            if t.loss_impl == "torch":  # plain logits + cross_entropy: no statistics (static mixing only)
                logits = h.float() @ lm_head_weight(model).float().t()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                       ignore_index=-100)
            else:
                loss = mixer.loss_and_stats(h, lm_head_weight(model), batch)
            (loss / n_micro).backward()
            loss_acc += float(loss.detach()) / n_micro
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 \
            else torch.tensor(float("nan"))
        opt.step()
        update = mixer.step(step, hidden_fn=lambda b: _eval_hidden(model, b, dtype),
                            lm_head_weight=lm_head_weight(model).detach())
        step_times.append(time.perf_counter() - ts)
        last_loss = loss_acc
        done = step + 1
        if update is not None:
            snap = update["snapshot"]
            logger.log("mixing", done, domain_train_loss=dict(zip(mixer.domains, snap.domain_loss.tolist())),
                       counts=dict(zip(mixer.domains, snap.counts.tolist())),
                       gram=np.asarray(snap.gram).tolist())
            if update["changed"]:
                logger.log("weights", done, weights=dict(zip(mixer.domains, update["weights"].tolist())))
        if done % t.log_every == 0 or done == t.steps:
            tel = mixer.loader.telemetry()
            logger.log("train", done, loss=last_loss, lr=lr_at(step, cfg), grad_norm=float(gnorm),
                       step_seconds=float(np.median(step_times[-t.log_every:])),
                       tokens_per_second=tokens_per_step / float(np.median(step_times[-t.log_every:])),
                       realised_share=tel.get("realised_share", {}))
            bar.set_postfix(loss=f"{last_loss:.3f}")
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            vl = evaluate(model, eval_store, eval_domains or mixer.domains, cfg, dtype)
            logger.log("eval", done, valid_loss=vl, valid_loss_avg=_avg(vl))
            if log_to_stdout:
                tqdm.write(f"step {done}: train {last_loss:.3f} | valid avg {_avg(vl):.3f} | " +
                           " ".join(f"{k}={v:.2f}" for k, v in vl.items()))
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
            ckpt.save(done, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "mixer": mixer.state_dict(), "torch_rng": torch.get_rng_state(),
                             "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                             "step": done, "config": cfg.to_dict()})
    bar.close()
    wall = time.time() - t0
    logger.close()
    from megamix.train.metrics import read_metrics
    recs = read_metrics(out_dir / "metrics.jsonl")
    evals = [r for r in recs if r["kind"] == "eval"]
    final_vl = evals[-1]["valid_loss"] if evals else evaluate(model, eval_store, eval_domains or mixer.domains,
                                                                 cfg, dtype)
    plot = plot_run(out_dir / "metrics.jsonl", out_dir / "curves.png",
                    title=f"{cfg.mixing.strategy} — {Path(out_dir).name}")
    tps = tokens_per_step / float(np.median(step_times)) if step_times else float("nan")
    result = TrainResult(out_dir=str(out_dir), steps=t.steps, valid_loss=final_vl,
                         valid_loss_avg=_avg(final_vl), train_loss=last_loss,
                         weights=dict(zip(mixer.domains, mixer.weights.tolist())),
                         tokens_per_second=tps, wall_seconds=wall,
                         history=[{"step": r["step"], "valid_loss": r["valid_loss"]} for r in evals],
                         plot=str(plot))
    (out_dir / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result

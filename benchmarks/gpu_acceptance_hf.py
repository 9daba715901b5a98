"""GPU acceptance item ``hf_trainer_bf16``: a ``transformers.Trainer`` with ``bf16=True`` and online mixing.

A tiny Llama (untied head) is patched with ``apply_megamix`` (megamix's fused LM head) and trained by
``MegamixTrainer`` (megamix's loader feeds every micro-batch, ``MegamixCallback`` runs ``Mixer.step``, R&B
every ``mixing.update_every`` steps). With ``bf16=True`` the Trainer runs the forward under bf16 autocast on
the GPU; the master weights, hence the fused head, stay fp32. ``examples/hf_trainer_loop.py`` has no bf16
switch, so the acceptance script uses this driver.

Writes ``<out-dir>/result.json``: ``final_loss``, the per-step ``losses``, ``path`` (fused/capture), the
``mixing_rounds`` seen, the model's device, ``bf16``, the weight history. ``--dry-run`` builds every piece (config,
store, Mixer, model, TrainingArguments, MegamixTrainer, which checks its arguments against the megamix config)
and trains nothing; it needs no GPU.

    python benchmarks/gpu_acceptance_hf.py --data-dir runs/gpu_acceptance/data --out-dir runs/gpu_acceptance/hf --steps 8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

MICRO, GLOBAL, SEQ = 4, 16, 64


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="Folder holding tokens/.")
    ap.add_argument("--out-dir", required=True, help="TrainingArguments.output_dir; result.json goes here.")
    ap.add_argument("--steps", type=int, default=8, help="TrainingArguments.max_steps.")
    ap.add_argument("--k", type=int, default=2, help="mixing.update_every.")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16=True.")
    ap.add_argument("--dry-run", action="store_true", help="Build everything, train nothing (no GPU needed).")
    args = ap.parse_args(argv)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations.hf import apply_megamix
    from megamix.integrations.hf_trainer import MegamixTrainer
    from megamix.mixer import Mixer

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", f"model.seq_len={SEQ}", f"train.global_batch_size={GLOBAL}",
        f"train.micro_batch_size={MICRO}", "projection.k1=16", "projection.k2=8", "mixing.strategy=rnb",
        f"mixing.update_every={args.k}", "mixing.min_weight=0.02"]).validate()
    store = TokenStore(Path(args.data_dir) / "tokens")
    n_micro = GLOBAL // (MICRO * world)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=store.vocab_size, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=SEQ, tie_word_embeddings=False))
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=n_micro, learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, bf16=args.bf16, use_cpu=not cuda,
        disable_tqdm=True, dataloader_num_workers=0)
    mixer = Mixer(cfg, store, rank=targs.process_index, world_size=targs.world_size)
    patch = apply_megamix(model, mixer)                       # the fused LM head
    rounds: list[int] = []
    step_fn = mixer.step

    def counting_step(step, *a, **kw):                        # count the mixing rounds the callback runs
        upd = step_fn(step, *a, **kw)
        if upd is not None:
            rounds.append(step + 1)
        return upd

    mixer.step = counting_step
    trainer = MegamixTrainer(mixer=mixer, model=model, args=targs)
    result = {"dry_run": args.dry_run, "bf16": args.bf16, "cuda": cuda, "path": trainer.megamix.path,
              "steps": args.steps, "k": args.k, "n_micro": n_micro, "vocab_size": store.vocab_size,
              "domains": list(mixer.domains)}
    if not args.dry_run:
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        losses = {int(h["step"]): float(h["loss"]) for h in logs}
        final = losses[max(losses)] if losses else float("nan")
        result.update(
            global_step=trainer.state.global_step, losses=losses, final_loss=final,
            all_finite=bool(losses) and all(math.isfinite(x) for x in losses.values()),
            mixing_rounds=rounds, fused_calls=getattr(patch, "calls", None),
            device=str(next(model.parameters()).device), param_dtype=str(next(model.parameters()).dtype),
            weights=mixer.weights.tolist(), weight_history=[[int(s), list(map(float, w))]
                                                            for s, w in mixer.weight_history],
            peak_device_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result.get(k) for k in ("dry_run", "path", "bf16", "device", "global_step", "final_loss",
                                                 "mixing_rounds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

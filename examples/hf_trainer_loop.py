"""Online data mixing in a Hugging Face Trainer script: megamix feeds the batches and resumes with the checkpoints.

The script keeps its model, TrainingArguments, evaluation set and ``trainer.train(...)``. megamix changes three
places (marked ``# megamix``). It builds a Mixer for this process. It patches the model with ``apply_megamix``
(the fused LM head; without it the capture path records the statistics). It replaces
``Trainer(..., train_dataset=...)`` with ``MegamixTrainer(mixer=mixer, ...)``. The mixing state is saved in every
``checkpoint-N`` folder and restored by ``resume_from_checkpoint``. Launch one process per device:

    python examples/hf_trainer_loop.py --data-dir data --steps 8 --out-dir runs/hf-trainer
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_loop.py --data-dir data --steps 8 --resume

Each rank writes a JSON summary: ``<out-dir>/summary_rank<R>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="Folder holding tokens/ (built by `megamix data build`).")
    ap.add_argument("--steps", type=int, default=8, help="Optimizer steps (TrainingArguments.max_steps).")
    ap.add_argument("--save-steps", type=int, default=2, help="Checkpoint every N steps.")
    ap.add_argument("--out-dir", default="runs/hf-trainer", help="TrainingArguments.output_dir.")
    ap.add_argument("--resume", action="store_true", help="Resume from the last checkpoint in --out-dir.")
    ap.add_argument("--capture", action="store_true", help="Keep the model's own loss (capture path, no patch).")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher

    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations.hf import apply_megamix
    from megamix.integrations.hf_trainer import MegamixTrainer
    from megamix.loader import eval_batches
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", "model.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
        "mixing.update_every=2", "mixing.min_weight=0.02"]).validate()
    store = TokenStore(Path(args.data_dir) / "tokens")
    micro = cfg.train.micro_batch_size
    n_micro = cfg.train.global_batch_size // (micro * world)

    # --- your model and TrainingArguments (unchanged) ---
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=store.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, tie_word_embeddings=False))
    targs = TrainingArguments(
        output_dir=args.out_dir, max_steps=args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=n_micro, learning_rate=3e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
        save_steps=args.save_steps, logging_steps=1, report_to="none", seed=0, use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None, disable_tqdm=True)
    eval_set = [{"input_ids": ids, "labels": ids} for d in store.domains    # the first validation windows
                for b in eval_batches(store, d, seq_len=32, batch_size=4, max_batches=1) for ids in b.input_ids]

    # --- megamix ---
    mixer = Mixer(cfg, store, rank=targs.process_index, world_size=targs.world_size)   # megamix
    if not args.capture:
        apply_megamix(model, mixer)                                     # megamix: the fused LM head
    trainer = MegamixTrainer(mixer=mixer, model=model, args=targs,      # megamix: was Trainer(..., train_dataset=...)
                             eval_dataset=eval_set)
    trainer.train(resume_from_checkpoint=args.resume or None)
    metrics = trainer.evaluate()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"rank": targs.process_index, "world_size": targs.world_size, "path": trainer.megamix.path,
               "resumed_from": trainer.megamix_callback.resume_dir, "global_step": trainer.state.global_step,
               "eval_loss": metrics["eval_loss"], "losses": {h["step"]: h["loss"] for h in logs},
               "logged_weights": {h["step"]: {k: v for k, v in h.items() if k.startswith("megamix/")} for h in logs},
               "domains": mixer.domains, "weights": mixer.weights.tolist(),
               "weight_history": [list(x) for x in mixer.weight_history],
               "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters()))}
    Path(args.out_dir, f"summary_rank{targs.process_index}.json").write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

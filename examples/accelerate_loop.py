"""Online data mixing in a loop written on ``accelerate.Accelerator`` (no Trainer), with exact resume.

It uses the same pieces as ``MegamixTrainer`` (megamix/integrations/hf_trainer.py), marked ``# megamix``:
- a Mixer for this process and ``check_accelerator``;
- ``apply_megamix`` for the fused LM head (``--capture`` keeps the model's own loss, and the capture hook
  records the statistics);
- ``MegamixFeed``, which turns the Mixer's micro-batches into model arguments and binds their domains;
- ``feed.step`` after each optimizer step;
- ``save_state`` / ``load_state`` next to ``accelerator.save_state`` / ``load_state``.

Run it with one process per device:

    python examples/accelerate_loop.py --data-dir data --steps 8 --out-dir runs/accelerate
    torchrun --standalone --nproc_per_node 2 examples/accelerate_loop.py --data-dir data --steps 8 --resume

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
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=2, help="Save <out-dir>/checkpoint-N every N steps.")
    ap.add_argument("--out-dir", default="runs/accelerate")
    ap.add_argument("--resume", action="store_true", help="Resume from the newest checkpoint-N in --out-dir.")
    ap.add_argument("--capture", action="store_true", help="Keep the model's own loss (capture path, no patch).")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher

    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations.hf import apply_megamix
    from megamix.integrations.hf_trainer import MegamixFeed, check_accelerator, load_state, save_state
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", "model.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
        "mixing.update_every=2", "mixing.min_weight=0.02"]).validate()
    store = TokenStore(Path(args.data_dir) / "tokens")
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)

    # --- your model, optimizer and Accelerator (unchanged) ---
    accelerator = Accelerator(gradient_accumulation_steps=n_micro, cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=store.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, tie_word_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # --- megamix ---
    mixer = Mixer(cfg, store, rank=accelerator.process_index, world_size=accelerator.num_processes)  # megamix
    check_accelerator(accelerator, mixer)                      # megamix: same processes and accumulation steps
    if not args.capture:
        apply_megamix(model, mixer)                            # megamix: the fused LM head
    model, opt = accelerator.prepare(model, opt)
    feed = MegamixFeed(model, mixer)                           # megamix: batches in, statistics out
    out = Path(args.out_dir)
    start = 0
    saved = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if args.resume else []
    if saved:
        accelerator.load_state(saved[-1])
        start = load_state(mixer, saved[-1])                   # megamix: the loader continues where it stopped

    losses = {}
    for step in range(start, args.steps):
        total = 0.0
        for inputs in feed.micro_batches(accelerator.device):  # megamix: this rank's micro-batches
            with accelerator.accumulate(model):
                loss = model(**inputs).loss
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            total += loss.item() / n_micro
        feed.step(step)                                        # megamix: every K steps, new weights
        losses[step + 1] = total
        if (step + 1) % args.save_every == 0:
            accelerator.save_state(out / f"checkpoint-{step + 1}")
            save_state(mixer, out / f"checkpoint-{step + 1}", step + 1)  # megamix: every rank

    summary = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "path": feed.path,
               "start": start, "losses": losses, "weights": mixer.weights.tolist(),
               "weight_history": [list(x) for x in mixer.weight_history],
               "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters()))}
    out.mkdir(parents=True, exist_ok=True)
    Path(out, f"summary_rank{accelerator.process_index}.json").write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

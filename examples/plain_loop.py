"""Drop-in data mixing for a plain PyTorch training loop.

Your loop keeps its model, loss and optimizer. megamix adds four lines (marked ``# megamix``):
a Mixer (weighted loader + statistics + strategy), ``attach`` (the LM-head gradient capture),
``hook.set_batch`` before each forward and ``hook.after_optimizer_step`` after each optimizer step.

    python examples/plain_loop.py --data-dir data --steps 20

It prints the domain weights after every mixing update and writes a JSON summary with ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="Folder holding tokens/ (built by `megamix data build`).")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--update-every", type=int, default=2, help="Mixing update period K (steps).")
    ap.add_argument("--out", default=None, help="Write a JSON summary here.")
    args = ap.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations import attach
    from megamix.mixer import Mixer

    torch.manual_seed(0)
    store = TokenStore(Path(args.data_dir) / "tokens")

    # --- your model and optimizer (unchanged) ---
    seq_len, micro, n_micro = 32, 4, 2
    model = GPT2LMHeadModel(GPT2Config(vocab_size=store.vocab_size, n_positions=seq_len, n_embd=32,
                                       n_layer=1, n_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # --- megamix: the mixing config, the Mixer and the hook ---
    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", f"model.seq_len={seq_len}", f"model.vocab_size={store.vocab_size}",
        f"train.global_batch_size={micro * n_micro}", f"train.micro_batch_size={micro}",
        "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
        f"mixing.update_every={args.update_every}", "mixing.min_weight=0.02"]).validate()
    mixer = Mixer(cfg, store)                                  # megamix
    hook = attach(model, mixer)                                # megamix

    history = []
    for step in range(args.steps):
        for batch in mixer.next_step():                        # megamix: replaces your DataLoader
            hook.set_batch(batch)                              # megamix
            logits = model(input_ids=batch.input_ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                   ignore_index=-100)
            (loss / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update = hook.after_optimizer_step(step)               # megamix
        if update is not None:
            w = dict(zip(mixer.domains, (round(float(x), 4) for x in update["weights"])))
            history.append({"step": step + 1, "loss": float(loss.detach()), "weights": w})
            print(f"step {step + 1}: loss {float(loss.detach()):.3f} weights {w}")
    hook.remove()
    summary = {"domains": mixer.domains, "initial_weights": mixer.initial_weights.tolist(),
               "final_weights": mixer.weights.tolist(), "history": history,
               "micro_steps_captured": hook.micro_steps}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

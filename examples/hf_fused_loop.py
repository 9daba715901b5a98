"""A Hugging Face causal LM on megamix's fused LM head: one line turns its loss into the fused kernel.

Your loop keeps its model and optimizer. megamix adds (marked ``# megamix``): a Mixer (weighted loader +
statistics + strategy), ``apply_megamix`` (the model's LM head + cross-entropy become megamix's fused
kernel, which also emits the per-sample gradient statistics; no [B, T, V] logits), ``patch.set_batch``
before each forward and ``mixer.step`` after each optimizer step.

    python examples/hf_fused_loop.py --data-dir data --steps 20

It prints the domain weights after every mixing update and writes a JSON summary with ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="Folder holding tokens/ (built by `megamix data build`).")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--update-every", type=int, default=2, help="Mixing update period K (steps).")
    ap.add_argument("--out", default=None, help="Write a JSON summary here.")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations.hf import apply_megamix
    from megamix.mixer import Mixer

    torch.manual_seed(0)
    store = TokenStore(Path(args.data_dir) / "tokens")

    # --- your model and optimizer (unchanged): a small randomly initialised Llama ---
    seq_len, micro, n_micro = 32, 4, 2
    model = LlamaForCausalLM(LlamaConfig(vocab_size=store.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=seq_len, tie_word_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # --- megamix: the mixing config, the Mixer and the one-line patch ---
    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", f"model.seq_len={seq_len}", f"model.vocab_size={store.vocab_size}",
        f"train.global_batch_size={micro * n_micro}", f"train.micro_batch_size={micro}",
        "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb",
        f"mixing.update_every={args.update_every}", "mixing.min_weight=0.02"]).validate()
    mixer = Mixer(cfg, store)                                  # megamix
    patch = apply_megamix(model, mixer)                        # megamix: the one line

    history = []
    for step in range(args.steps):
        for batch in mixer.next_step():                        # megamix: replaces your DataLoader
            patch.set_batch(batch)                             # megamix: the samples' domains
            loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         shift_labels=batch.labels).loss       # labels already shifted: shift_labels=
            (loss / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update = mixer.step(step)                              # megamix: every K steps, new weights
        if update is not None:
            w = dict(zip(mixer.domains, (round(float(x), 4) for x in update["weights"])))
            history.append({"step": step + 1, "loss": float(loss.detach()), "weights": w})
            print(f"step {step + 1}: loss {float(loss.detach()):.3f} weights {w}")
    summary = {"domains": mixer.domains, "initial_weights": mixer.initial_weights.tolist(),
               "final_weights": mixer.weights.tolist(), "history": history, "fused_forwards": patch.calls}
    patch.remove()
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

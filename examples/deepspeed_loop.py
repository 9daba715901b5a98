"""Your own DeepSpeed loop (any ZeRO stage) with megamix's fused LM head, online mixing and checkpoints.

Launch one process per rank, e.g. on CPU with two gloo ranks:

    torchrun --standalone --nproc_per_node 2 examples/deepspeed_loop.py --data-dir data --zero 3 --steps 8

megamix adds (marked ``# megamix``): the Mixer built with this rank's data-parallel position,
``apply_megamix(engine, mixer)`` (under ZeRO-3 it registers the partitioned LM-head weight with DeepSpeed),
``patch.set_batch`` before each forward, ``mixer.step`` at each accumulation boundary, and the checkpoint
layout of megamix's own loop (``Checkpoints``), so the mixing state resumes exactly with the engine.
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
    ap.add_argument("--zero", type=int, default=3, help="ZeRO stage 0-3.")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out-dir", default="runs/deepspeed-loop", help="Checkpoints and the JSON summary.")
    args = ap.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher

    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.integrations.deepspeed import build_ds_config, patch_cpu_op_builds
    from megamix.integrations.hf import apply_megamix
    from megamix.mixer import Mixer
    from megamix.train.backend import DeepSpeedBackend
    from megamix.train.checkpoint import Checkpoints

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={args.data_dir}", "model.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", f"deepspeed.zero_stage={args.zero}", "projection.k1=8", "projection.k2=4",
        "mixing.strategy=rnb", "mixing.update_every=2", "mixing.min_weight=0.02"]).validate()
    store = TokenStore(Path(args.data_dir) / "tokens")

    # --- your model and engine (unchanged) ---
    torch.manual_seed(0)
    patch_cpu_op_builds()                                       # CPU only: skip DeepSpeed's shm op build
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=store.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_ds_config(cfg, world))

    # --- megamix ---
    mixer = Mixer(cfg, store, rank=rank, world_size=world)     # megamix: this rank's slice of each batch
    patch = apply_megamix(engine, mixer)                       # megamix: the one line
    ckpt = Checkpoints(args.out_dir)                           # megamix: the loop's checkpoint layout
    backend = DeepSpeedBackend.from_engine(engine, rank, world)
    start = ckpt.load(backend, mixer)                          # resumes engine + mixing state (0 if none)

    for step in range(start, args.steps):
        for batch in mixer.next_step():                        # megamix: this step's micro-batches
            patch.set_batch(batch)                             # megamix
            loss = engine(input_ids=batch.input_ids.to(engine.device),
                          position_ids=batch.position_ids.to(engine.device),
                          shift_labels=batch.labels.to(engine.device)).loss
            engine.backward(loss)
            engine.step()                                      # the optimizer steps at the accumulation boundary
        mixer.step(step)                                       # megamix: every K steps, new weights on all ranks
        if (step + 1) % 4 == 0:
            ckpt.save(step + 1, backend, mixer, cfg)           # megamix: collective, every rank
    summary = {"rank": rank, "start": start, "weights": mixer.weights.tolist(),
               "weight_history": [list(x) for x in mixer.weight_history], "fused_forwards": patch.calls}
    Path(args.out_dir, f"summary_rank{rank}.json").write_text(json.dumps(summary))
    torch.distributed.barrier()                 # every rank is done with the process group ...
    torch.distributed.destroy_process_group()   # ... and its threads stop before the interpreter exits
    return summary


if __name__ == "__main__":
    main()

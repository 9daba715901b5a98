"""What DoGraph's in-step gradient reweighting costs per training step, on each LM-head path.

One process, a GPT-2 model of the tiny-cpu shape (2 layers, d=128, seq 128, micro-batch 4, V=50257 by
default) on real token-store batches, forward + backward of one micro-batch through the Hugging Face
model with megamix attached, ``mixing.strategy=dograph``. Variants:

- ``fused``: the fused LM head (``apply_megamix``) before the strategy has clusters: statistics only;
- ``fused+w``: the same with the cluster table installed: each chunk (cut at sample boundaries) gives its
  samples' factors before its dX/dW GEMMs (no extra GEMM);
- ``fused_small`` / ``fused_small+w``: ``projection.chunk_tokens`` below ``seq_len``, so a sample spans
  chunks and the weighted head runs two passes (the second recomputes every chunk's logits);
- ``capture`` / ``capture+w``: the model's own logits + cross-entropy with the capture hook, whose tensor
  hook returns the logits gradient scaled per sample.

The variants run interleaved (one step of each in turn) so machine load hits them alike; the first
``--warmup`` rounds are dropped and the median step time is reported with its ratio to the unweighted
variant of the same path, measured in the same run::

    python benchmarks/bench_dograph_weighting.py --data-dir data --out benchmarks/results/dograph_weighting_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_lm_head_paths import conditions  # noqa: E402

VARIANTS = ("fused", "fused+w", "fused_small", "fused_small+w", "capture", "capture+w")


def _setup(args, small: bool):
    """(model, mixer) for one path; the mixer's strategy gets its clusters from one real round."""
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    from megamix.train.model import build_model

    cfg = MegamixConfig.from_yaml(str(ROOT / "configs" / "tiny-cpu.yaml"), overrides=[
        f"data.data_dir={Path(args.data_dir).resolve()}", f"model.n_layer={args.n_layer}", f"model.n_embd={args.n_embd}",
        f"model.n_head={args.n_head}", f"model.seq_len={args.seq_len}", f"model.vocab_size={args.vocab}",
        f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro}", "mixing.strategy=dograph",
        "mixing.update_every=1", "projection.backend=torch",
        f"projection.chunk_tokens={args.seq_len // 2 if small else args.chunk_tokens}", *args.sets]).validate()
    store = TokenStore(Path(cfg.data.data_dir) / "tokens")
    torch.manual_seed(0)
    return build_model(cfg.model, seed=0), Mixer(cfg, store), cfg


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="Folder with tokens/ (megamix data build).")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4, help="Sequences per micro-batch.")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--chunk-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20, help="Measured rounds (one step of every variant each).")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine).")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="Extra config override (repeatable).")
    ap.add_argument("--out", default=None, help="Write the JSON report here.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cond = conditions() | {"threads": args.threads}
    t_start = time.time()
    from megamix.integrations import attach
    from megamix.integrations.hf import apply_megamix

    runs = {}
    for path in ("fused", "fused_small", "capture"):
        model, mixer, cfg = _setup(args, small=path == "fused_small")
        if path == "capture":
            hook = attach(model, mixer, auto_step=False)

            def step(batch, model=model, hook=hook):
                hook.set_batch(batch)
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
                tok = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                        batch.labels.reshape(-1), reduction="none")
                hook.record_loss(tok.reshape(batch.labels.shape), batch.labels)
                (tok.sum() / (batch.labels != -100).sum()).backward()
        else:
            patch = apply_megamix(model, mixer)

            def step(batch, model=model, patch=patch):
                patch.set_batch(batch)
                model(input_ids=batch.input_ids, position_ids=batch.position_ids, shift_labels=batch.labels,
                      use_cache=False).loss.backward()
        step(mixer.next_step()[0])
        mixer.step(0)                                    # the refresh: the strategy now has its clusters
        st = mixer.strategy
        table = (st.centroids, st.cluster_weights, st.cluster_shares)
        runs[path] = (model, mixer, step, table)

    times = {v: [] for v in VARIANTS}
    mean_w = {}
    for it in range(args.warmup + args.steps):
        for v in VARIANTS:
            path, weighted = v.removesuffix("+w"), v.endswith("+w")
            model, mixer, step, table = runs[path]
            mixer.strategy.set_clusters(*(table if weighted else (None, None, None)))
            batch = mixer.next_step()[0]
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(batch)
            dt = time.perf_counter() - t0
            mixer.stats.reset()
            if it >= args.warmup:
                times[v].append(dt)
            if weighted:
                w = mixer.head.last_sample_weights
                mean_w[v] = float(w[w > 0].mean()) if w is not None else None
    med = {v: float(np.median(times[v])) for v in VARIANTS}
    report = {
        "conditions": cond | {"load_avg_end": os.getloadavg(), "wall_seconds": time.time() - t_start},
        "shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "seq_len": args.seq_len, "micro_batch": args.micro,
                  "vocab_size": args.vocab, "chunk_tokens": args.chunk_tokens,
                  "chunk_tokens_small": args.seq_len // 2, "k1xk2": [cfg.projection.k1, cfg.projection.k2]},
        "what": "forward+backward of one micro-batch, fp32, CPU, interleaved variants, median over measured rounds",
        "steps_measured": args.steps, "warmup_dropped": args.warmup,
        "median_step_seconds": med,
        "weighted_vs_unweighted": {v: med[v] / med[v.removesuffix("+w")] - 1.0 for v in VARIANTS if v.endswith("+w")},
        "small_chunks_vs_default_chunks_unweighted": med["fused_small"] / med["fused"] - 1.0,
        "mean_weight_check": mean_w,
        "gpu": "not measured on GPU",
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()

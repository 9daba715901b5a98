"""`megamix regroup`: R&B Regroup, i.e. embedding k-means with a silhouette k sweep; clusters become
the domains ``cluster_00..`` of a new data directory (corpus + token store). Every document is kept.

Runs on one process, or sharded over ranks under torchrun / the deepspeed launcher / SLURM
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` from the launcher; a gloo group is created here)."""
from __future__ import annotations

import argparse
import os
import sys

from megamix import comm
from megamix.commands.train import dist_env
from megamix.configbase import ConfigError


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--k must be comma-separated integers like 4,6,8 (got {text!r})")
    if not ks or min(ks) < 2:
        raise SystemExit("--k needs integers >= 2, e.g. --k 4,6,8")
    return ks


def register(sub) -> None:
    p = sub.add_parser("regroup", help="Regroup documents into embedding clusters (R&B Regroup).",
                       description="Embeds documents (megamix.embed), sweeps k with MiniBatchKMeans "
                                   "scored by silhouette, and writes the best clustering as a new "
                                   "corpus/token store with domains cluster_00.. under --out-dir, plus "
                                   "regroup/{report.json, mapping.jsonl, regroup.png}.")
    p.add_argument("--data-dir", default="data", help="Source data dir (with corpus/).")
    p.add_argument("--out-dir", required=True, help="New data dir for the regrouped corpus.")
    p.add_argument("--k", default="4,6,8", help="Candidate cluster counts, e.g. 4,6,8.")
    p.add_argument("--fit-docs", type=int, default=20000,
                   help="Fit k-means and score k on a seeded sample of at most this many training documents; "
                        "every document is then assigned to its nearest centroid.")
    p.add_argument("--max-docs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--domains", default=None, help="Comma-separated source domains (default: all).")
    p.add_argument("--embedder", default="minilm", help="Embedding backend (megamix.embed), e.g. minilm, hashing.")
    p.add_argument("--max-tokens", type=int, default=128, help="Truncate documents to this many tokens.")
    p.add_argument("--embed-batch", type=int, default=64, help="Documents per embedding batch.")
    p.add_argument("--kmeans-batch", type=int, default=1024, help="Rows per MiniBatchKMeans.partial_fit.")
    p.add_argument("--epochs", type=int, default=5, help="Passes of partial_fit over the embeddings.")
    p.add_argument("--silhouette-sample", type=int, default=10000, help="Points used for silhouette.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenize", action="store_true", help="Write the corpus only, not tokens/.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing regrouped output.")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.max_docs is not None:
        raise ConfigError("--max-docs was removed: regroup now keeps every document; use --fit-docs N to "
                          "fit k-means on a sample of N documents")
    for flag, v in (("--fit-docs", args.fit_docs), ("--embed-batch", args.embed_batch),
                    ("--kmeans-batch", args.kmeans_batch), ("--epochs", args.epochs),
                    ("--silhouette-sample", args.silhouette_sample), ("--max-tokens", args.max_tokens)):
        if v < 1 or (flag == "--fit-docs" and v < 2):
            raise ConfigError(f"{flag} must be >= {2 if flag == '--fit-docs' else 1} (got {v})")
    from megamix.regroup import regroup

    rank, world, _ = dist_env()
    group = None
    if world > 1:
        import torch.distributed as dist
        if not os.environ.get("MASTER_ADDR"):
            raise ConfigError(f"WORLD_SIZE={world} but MASTER_ADDR is not set; launch with torchrun, the "
                              "deepspeed launcher or launch/slurm.sbatch, which set it")
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world)
    doms = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    try:
        rep = regroup(args.data_dir, args.out_dir, _ks(args.k), embedder=args.embedder,
                      max_tokens=args.max_tokens, fit_docs=args.fit_docs, domains=doms, seed=args.seed,
                      embed_batch=args.embed_batch, kmeans_batch=args.kmeans_batch, epochs=args.epochs,
                      silhouette_sample=args.silhouette_sample, tokenize=not args.no_tokenize,
                      overwrite=args.overwrite, progress=not args.no_progress, rank=rank, world_size=world,
                      group=group)
    except BaseException as e:
        comm.shutdown(wait=False)   # the other ranks may not be at the same point: no barrier
        if isinstance(e, (FileExistsError, FileNotFoundError)):
            raise ConfigError(str(e)) from None
        raise
    comm.shutdown()
    if rank:
        return 0
    print("k  silhouette")
    for k in rep["ks"]:
        v = rep["per_k"][str(k)]
        print(f"{k:<3d}{v['silhouette']:.4f}" if "silhouette" in v else f"{k:<3d}skipped: {v['skipped']}")
    print(f"best k = {rep['best_k']} (fitted on {rep['fit_documents']} documents): every one of the "
          f"{rep['documents']} documents -> {args.out_dir}/corpus/"
          f"cluster_00..cluster_{rep['best_k'] - 1:02d}")
    print(f"report: {args.out_dir}/regroup/report.json  plot: {rep.get('plot', '-')}", file=sys.stderr)
    return 0

"""GPU acceptance item ``stats_allreduce_cuda_gloo``: the mixing statistics' all-reduce on device tensors.

Two processes on one GPU join a process group created with ``backend="cuda:gloo"``: gloo registered for
CUDA tensors only, as NCCL is (NCCL itself cannot put two ranks on one GPU). Any collective that megamix
issues on a CPU tensor therefore fails here with "no backend for device cpu", which is the point: on a real
NCCL job such a collective would fail the same way.

Each rank builds a :class:`megamix.mixer.Mixer` (rank-sharded loader, R&B, ``mixing.update_every=K``), runs
its one micro-batch of the step through ``Mixer.loss_and_stats`` with CUDA tensors (a seeded embedding as the
hidden states, a seeded LM-head matrix, identical on both ranks), calls ``backward`` and then
``Mixer.step(K - 1)``, the update step: all-reduce of the statistics, strategy, weight broadcast, loader update.

Pass: both ranks finish, hold bit-identical new weights and weight histories, and the reduced snapshot
counts every rank's samples (sum of counts = global batch). Each rank ends the job with ``comm.shutdown`` (a
barrier, then the group's destruction) and only then writes its report. A rank process that dies by a signal
after that report (gloo's threads at interpreter exit; seen once in about 100 runs on a loaded 2-core machine
before the barrier was added) is listed under ``"exit_warnings"`` and does not fail the item: the collectives
under test had finished and agreed. Death before the report fails it, with the signal named; ``faulthandler``
prints every thread's Python stack on such a crash. Each rank writes ``<out-dir>/rank<R>.json``;
the parent compares them and writes ``<out-dir>/result.json`` (``"ok"``, ``"problems"``).

    python benchmarks/gpu_acceptance_dist.py --data-dir runs/gpu_acceptance/data --out-dir runs/gpu_acceptance/dist

``--backend gloo --device cpu`` runs the same flow on CPU (the acceptance script's dry run does this).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path

WORLD = 2
MICRO = 4          # one micro-batch of 4 sequences per rank per step: global batch 8
SEQ = 64


def _overrides(data_dir: str, k: int) -> list[str]:
    return [f"data.data_dir={data_dir}", f"model.seq_len={SEQ}", f"train.global_batch_size={MICRO * WORLD}",
            f"train.micro_batch_size={MICRO}", "projection.k1=16", "projection.k2=8", "mixing.strategy=rnb",
            f"mixing.update_every={k}", "mixing.min_weight=0.02", "train.seed=0"]


def _worker(rank: int, args: argparse.Namespace) -> None:
    out = Path(args.out_dir)
    report: dict = {"rank": rank, "ok": False}
    faulthandler.enable()      # a SIGABRT/SIGSEGV prints every thread's Python stack to stderr
    try:
        import numpy as np
        import torch
        import torch.distributed as dist

        from megamix import comm
        from megamix.config import MegamixConfig
        from megamix.data.store import TokenStore
        from megamix.mixer import Mixer

        torch.set_num_threads(1)
        dev = torch.device(args.device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=args.backend, init_method=f"file://{out / 'pg_init'}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=args.pg_timeout))
        report["backend"] = str(dist.get_backend())
        cfg = MegamixConfig.from_yaml(None, overrides=_overrides(args.data_dir, args.k)).validate()
        store = TokenStore(Path(args.data_dir) / "tokens")
        group = dist.group.WORLD
        mixer = Mixer(cfg, store, rank=rank, world_size=WORLD, group=group)
        V, d = store.vocab_size, 64
        g = torch.Generator().manual_seed(0)                       # the same "model" on every rank
        emb = (torch.randn(V, d, generator=g) * 0.02).to(dev).requires_grad_()
        head = (torch.randn(V, d, generator=g) * 0.02).to(dev).requires_grad_()
        batches = mixer.next_step()
        report["micro_batches"] = len(batches)
        losses = []
        for batch in batches:
            hidden = emb[batch.input_ids.to(dev)]                 # [b, T, d] on the device
            loss = mixer.loss_and_stats(hidden, head, batch)
            loss.backward()
            losses.append(float(loss.detach()))
        report["loss"] = losses
        report["stats_device"] = str(getattr(mixer.stats, "sums", torch.empty(0)).device)
        K = cfg.mixing.update_every
        update = mixer.step(K - 1)                                 # the update step: all-reduce on device tensors
        if update is None:
            raise RuntimeError(f"Mixer.step({K - 1}) with mixing.update_every={K} returned no update")
        snap = update["snapshot"]
        report.update(
            weights=[float(x) for x in np.asarray(update["weights"], dtype=np.float64)],
            loader_weights=[float(x) for x in mixer.weights],
            weight_history=[[int(s), [float(x) for x in w]] for s, w in mixer.weight_history],
            changed=bool(update["changed"]), counts=[int(c) for c in np.asarray(snap.counts)],
            reduced=bool(snap.extra.get("reduced", False)), domains=list(mixer.domains),
            sums_checksum=float(np.asarray(snap.sums, dtype=np.float64).sum()),
            global_batch=cfg.train.global_batch_size)
        comm.shutdown()                                            # barrier, then destroy every group
        report["ok"] = True
    except BaseException as e:  # noqa: BLE001 - the parent reports every rank's failure
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-4000:]
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    if not report["ok"]:
        print(f"rank {rank} failed: {report['error']}\n{report['traceback']}", file=sys.stderr, flush=True)


def compare(reports: list[dict]) -> list[str]:
    """Problems found in the ranks' reports (empty = pass)."""
    problems = []
    for r in reports:
        if not r.get("ok"):
            problems.append(f"rank {r.get('rank')} did not finish: {r.get('error', 'no report')}")
    if problems:
        return problems
    r0 = reports[0]
    for r in reports[1:]:
        for key in ("weights", "loader_weights", "weight_history", "counts", "domains"):
            if r[key] != r0[key]:
                problems.append(f"rank {r['rank']} {key} {r[key]} != rank 0 {r0[key]}")
    for r in reports:
        if r["weights"] != r["loader_weights"]:
            problems.append(f"rank {r['rank']}: the loader's weights {r['loader_weights']} are not the update's "
                            f"{r['weights']}")
        if sum(r["counts"]) != r["global_batch"]:
            problems.append(f"rank {r['rank']}: the reduced counts {r['counts']} sum to {sum(r['counts'])}, not the "
                            f"global batch {r['global_batch']}: the statistics were not summed over the ranks")
        if not all(math.isfinite(x) for x in r["loss"] + r["weights"]):
            problems.append(f"rank {r['rank']}: non-finite loss or weights ({r['loss']}, {r['weights']})")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="Folder holding tokens/ (megamix.data.testing.build_tiny_store).")
    ap.add_argument("--out-dir", required=True, help="Where the ranks' reports and result.json go.")
    ap.add_argument("--backend", default="cuda:gloo", help="init_process_group backend (default cuda:gloo).")
    ap.add_argument("--device", default="cuda", help="Device of both ranks' tensors (default cuda = cuda:0).")
    ap.add_argument("--k", type=int, default=2, help="mixing.update_every; the step called is K-1.")
    ap.add_argument("--pg-timeout", type=float, default=120.0, help="Process-group timeout in seconds.")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in [out / "pg_init", out / "result.json", *out.glob("rank*.json")]:
        f.unlink(missing_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch.multiprocessing as mp

    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print("gpu_acceptance_dist: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:                      # every rank runs to its end: none is terminated for another's death
        p.join(args.pg_timeout + 300)
        if p.exitcode is None:
            p.kill()
            p.join()
    reports = []
    for r in range(WORLD):
        f = out / f"rank{r}.json"
        reports.append(json.loads(f.read_text()) if f.exists() else {"rank": r, "ok": False, "error": "no report"})
    problems, exit_warnings = compare(reports), []
    for r, p in enumerate(procs):
        if p.exitcode == 0:
            continue
        how = f"signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"
        if reports[r].get("ok"):
            exit_warnings.append(f"rank {r} died by {how} after the job ended (shutdown done, report written)")
        else:
            problems.append(f"rank {r} died by {how} before finishing (its stderr has the stack)")
    result = {"ok": not problems, "problems": problems, "exit_warnings": exit_warnings,
              "backend": args.backend, "device": args.device,
              "world_size": WORLD, "k": args.k,
              "ranks": [{k: r.get(k) for k in ("rank", "backend", "stats_device", "loss", "weights", "counts",
                                                "changed", "error")} for r in reports]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("ok", "problems", "exit_warnings", "backend", "device")}))
    for r in reports:
        print(f"rank {r.get('rank')}: backend={r.get('backend')} stats on {r.get('stats_device')} "
              f"loss={r.get('loss')} weights={r.get('weights')} counts={r.get('counts')}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

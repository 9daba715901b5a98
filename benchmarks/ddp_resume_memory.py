"""Host memory of each rank while a 2-rank DDP run resumes: ``model.pt`` read into every rank's memory (``torch.load``,
what every rank did before) against mapped (``torch.load(mmap=True)``, what
:func:`megamix.train.backend.read_model_file` does now).

A 2-rank DDP run (gloo, CPU) of one step writes a checkpoint (model + AdamW state in ``model.pt``); then, for each
variant, a copy of that run resumes in two fresh processes and trains one more step. Each rank records its memory
(``/proc/self/status``: private ``RssAnon``, file-backed ``RssFile``, ``VmRSS``; ``/proc/self/smaps_rollup``: ``Pss``;
``ru_maxrss``) before the read, after it, after the load, and once the resume has returned (the read state dropped),
and a thread samples ``RssAnon``/``VmRSS`` every millisecond in between for the peaks. ``torch.load`` puts a private
copy of the whole file in every rank; mapped, the file's pages are the page cache (one copy per node, counted in the
RSS of every rank that touches them, split between them in PSS) and a rank's private memory only grows by what it
keeps: on the CPU the optimizer state (the parameters exist already); on a GPU nothing.

    python benchmarks/ddp_resume_memory.py --out benchmarks/results/ddp_resume_memory.json

Without ``--data-dir`` the tiny test store is built in a temporary folder (a few seconds).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_lm_head_paths import conditions  # noqa: E402

VARIANTS = ("torch.load", "mmap")
WORLD = 2
MB = 1 << 20


def _status() -> dict[str, int]:
    """This process's ``RssAnon``, ``RssFile`` and ``VmRSS`` in bytes."""
    keys = {"RssAnon": "anon", "RssFile": "file", "VmRSS": "rss"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[keys[k]] = int(v.split()[0]) * 1024
    return out


def _point() -> dict[str, int]:
    """Memory now: :func:`_status`, the proportional set size and the peak RSS so far (``ru_maxrss``)."""
    out = _status()
    with open("/proc/self/smaps_rollup") as f:
        out["pss"] = next(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


class _Sampler(threading.Thread):
    """The largest ``RssAnon`` and ``VmRSS`` seen, sampled every millisecond until :meth:`finish`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.peak = {"anon": 0, "rss": 0}

    def run(self):
        while not self.done.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            self.done.wait(0.001)

    def finish(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return dict(self.peak)


def _probe_backend(variant: str | None, rank: int):
    """A DDPBackend that records its memory around the resume; ``variant`` ``torch.load`` reads and loads the way
    every rank did before mapping (the whole file into memory; the optimizer keeps the loaded tensors)."""
    import torch

    from megamix.train.backend import MODEL_FILE, DDPBackend

    class Probe(DDPBackend):
        probe: dict = {}

        def read(self, ckpt_root, tag):
            self.probe = {"before_read": _point()}
            self._sampler = _Sampler()
            self._sampler.start()
            if variant == "torch.load":
                state = torch.load(Path(ckpt_root) / tag / MODEL_FILE, map_location="cpu", weights_only=False)
            else:
                state = super().read(ckpt_root, tag)
            self.probe["after_read"] = _point()
            return state

        def load(self, ckpt_root, tag, state=None):
            if variant == "torch.load":
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                super().load(ckpt_root, tag, state)
            self.probe["after_load"] = _point()

        def before_step(self, step):
            if "resumed" not in self.probe and hasattr(self, "_sampler"):
                self.probe["resumed"] = _point()   # Checkpoints.load has returned: the read state is dropped
                self.probe["sampled_peak"] = self._sampler.finish()
            super().before_step(step)

    return Probe(rank, WORLD)


def _worker(rank: int, port: int, overrides: list[str], variant: str | None, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    from megamix.config import MegamixConfig
    from megamix.train.loop import train

    # the process group first thing (DDPBackend.init reuses it): one set up later in a busy process now and then
    # never finished connecting on the shared test machine
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(minutes=3))
    cfg = MegamixConfig.from_yaml(None, overrides).validate()
    backend = _probe_backend(variant, rank)
    train(cfg, backend=backend, progress=False, log_to_stdout=False)
    torch.distributed.destroy_process_group()
    if variant is not None:
        Path(out, f"{variant}.rank{rank}.json").write_text(json.dumps(backend.probe))


def _spawn(overrides: list[str], variant: str | None, out: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, overrides, variant, str(out)), nprocs=WORLD, join=True)


def _summary(p: dict) -> dict:
    """MiB (2^20 bytes, the ``_mb`` fields) of one rank's probe: the peaks over the resume and what the resume added
    to the private memory (``anon_added_peak``) and kept (``anon_kept``) on top of the built model."""
    pts = [p[k] for k in ("before_read", "after_read", "after_load", "resumed")]
    anon_peak = max([p["sampled_peak"]["anon"]] + [x["anon"] for x in pts])
    rss_peak = max([p["sampled_peak"]["rss"]] + [x["rss"] for x in pts])
    base = p["before_read"]
    return {"anon_peak_mb": anon_peak / MB, "anon_added_peak_mb": (anon_peak - base["anon"]) / MB,
            "anon_kept_mb": (p["resumed"]["anon"] - base["anon"]) / MB, "rss_peak_mb": rss_peak / MB,
            "pss_after_load_mb": p["after_load"]["pss"] / MB, "file_rss_after_load_mb": p["after_load"]["file"] / MB,
            "ru_maxrss_before_mb": base["maxrss"] / MB, "ru_maxrss_after_mb": p["resumed"]["maxrss"] / MB}


def measure(data_dir: Path, work: Path, n_embd: int, n_layer: int, n_head: int, writer: str = "ddp") -> dict:
    """Write the checkpoint (``writer``: a 2-rank DDP run, or the plain backend in this process: the same
    ``model.pt``, quicker), resume it on 2 ranks once per variant; returns the report (module docstring)."""
    base = [f"data.data_dir={data_dir}", f"model.n_embd={n_embd}", f"model.n_layer={n_layer}",
            f"model.n_head={n_head}", "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0", "train.threads=1",
            "train.log_every=1", "projection.k1=8", "projection.k2=4", "mixing.strategy=rnb", "mixing.update_every=2",
            "logging.tensorboard=false"]
    if writer == "ddp":
        _spawn(base + [f"train.out_dir={work / 'run'}", "train.steps=1"], None, work)
    else:
        from megamix.config import MegamixConfig
        from megamix.train.loop import train

        cfg = MegamixConfig.from_yaml(None, base + [f"train.out_dir={work / 'run'}", "train.steps=1"]).validate()
        train(cfg, progress=False, log_to_stdout=False)
    model_pt = work / "run" / "checkpoints" / "step_0000001" / "model.pt"
    import torch

    tensors = torch.load(model_pt, mmap=True, weights_only=False)["model"].values()
    params = sum({t.data_ptr(): t.numel() for t in tensors}.values())   # tied weights once
    rep: dict = {"model_pt_bytes": model_pt.stat().st_size, "model_params": params, "ranks": WORLD,
                 "written_by": writer, "variants": {}}
    for variant in VARIANTS:
        run = work / f"resume-{variant}"
        shutil.copytree(work / "run", run)
        _spawn(base + [f"train.out_dir={run}", "train.steps=2"], variant, work)
        probes = [json.loads((work / f"{variant}.rank{r}.json").read_text()) for r in range(WORLD)]
        rep["variants"][variant] = {"per_rank": [_summary(p) for p in probes], "raw": probes}
        shutil.rmtree(run)
    old, new = (rep["variants"][v]["per_rank"] for v in VARIANTS)
    rep["anon_peak_saved_mb_per_rank"] = [o["anon_peak_mb"] - n["anon_peak_mb"] for o, n in zip(old, new)]
    return rep


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="Folder with tokens/ (default: build the tiny test store).")
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--writer", choices=("ddp", "plain"), default="ddp",
                    help="What writes the checkpoint: a 2-rank DDP run, or the plain backend in this process.")
    ap.add_argument("--out", default=None, help="Write the report (JSON) here.")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ddp_resume_memory_") as tmp:
        data = Path(args.data_dir).resolve() if args.data_dir else None
        if data is None:
            from megamix.data.testing import build_tiny_store

            data = build_tiny_store(Path(tmp) / "data").parent
        rep = measure(data, Path(tmp), args.n_embd, args.n_layer, args.n_head, args.writer)
    import torch

    rep["model"] = {"n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head, "seq_len": 32,
                    "optimizer": "AdamW (fp32 state)", "device": "cpu", "backend": "ddp (gloo)"}
    rep["rule"] = ("torch.load: every rank holds a private copy of the whole model.pt (model + optimizer state) "
                   "during the resume, on top of its own model. mmap: model.pt is mapped read-only; its pages are "
                   "the node's page cache (one copy for all the node's ranks, reclaimable, released when the resume "
                   "returns); a rank's private memory grows only by what it keeps: the optimizer state it trains "
                   "with when that lives on the CPU, nothing beyond the device copies on a GPU")
    rep["conditions"] = {**conditions(), "torch_threads_per_rank": 1, "torch_version": torch.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")
    for v in VARIANTS:
        for r, s in enumerate(rep["variants"][v]["per_rank"]):
            print(f"{v:10s} rank {r}: private peak {s['anon_peak_mb']:.0f} MB (+{s['anon_added_peak_mb']:.0f} over the "
                  f"built model, {s['anon_kept_mb']:.0f} kept), RSS peak {s['rss_peak_mb']:.0f} MB, ru_maxrss "
                  f"{s['ru_maxrss_after_mb']:.0f} MB")
    print(f"model.pt: {rep['model_pt_bytes'] / MB:.0f} MB")
    return rep


if __name__ == "__main__":
    main()

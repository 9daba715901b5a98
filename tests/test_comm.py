"""megamix.comm, the one owner of communication, and the NCCL contract seen on a CPU.

NCCL takes device tensors only, and a collective's ``src`` is a global rank. On a CPU machine both rules can be
checked without a GPU:

- **A group that refuses CPU tensors, as NCCL does.** ``init_process_group("cuda:gloo")`` registers gloo for the
  cuda device type only; a collective on a CPU tensor then fails with NCCL's error ("No backend type associated
  with device type cpu"). Every megamix path is run on such a group: it must get as far as asking for a CUDA
  device (which a CPU machine does not have), never fail with the CPU-backend error. Before megamix.comm, every
  path failed with the CPU-backend error at its first collective (the statistics were CPU tensors).
- **A recorder** wraps torch.distributed's collectives during real 2-rank gloo runs of the same paths (the
  DeepSpeed backend's training loop with held-out gradients and a checkpoint, a resume, DoGraph on the DDP
  backend with the non-finite guard, the HF Trainer/Accelerate feed, regroup) and checks every collective megamix
  issues: it comes from megamix.comm, its tensors are on a device type the group's backend serves, and a
  broadcast's source is group-relative (``group_src``), never a global ``src``.
- **One owner**, statically: no module but megamix/comm.py calls a torch.distributed collective.
- **Failures reach every rank**: rank 0 failing inside ``comm.together`` (checkpoint writing, regroup's output,
  the run's start-up files) stops every rank with the same one-line error within seconds.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
import traceback
from pathlib import Path

import pytest
import torch

from megamix import comm
from ranks import free_port as _free_port, spawn

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
CUDA_MISSING = ("Torch not compiled with CUDA enabled", "no CUDA GPUs are available", "Found no NVIDIA driver")
CPU_BACKEND = "No backend type associated with device type cpu"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "broadcast_object_list",
               "all_gather_object", "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "gather_object", "scatter_object_list",
               "monitored_barrier", "reduce_scatter")



def _setup_rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ one owner, statically
def test_no_module_but_comm_calls_a_collective():
    pattern = re.compile(r"\b(?:dist|distributed|torch\.distributed)\.(" + "|".join(COLLECTIVES) + r")\(")
    offenders = []
    for p in sorted(list((REPO / "megamix").rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))):
        if p == REPO / "megamix" / "comm.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line) and not line.strip().startswith("#"):
                offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "collectives outside megamix/comm.py:\n" + "\n".join(offenders)


def test_outside_a_distributed_job_comm_is_the_identity():
    t = torch.arange(3.0)
    assert comm.size() == 1 and comm.rank() == 0 and comm.src_rank() == 0
    assert comm.all_reduce(t) is t and comm.broadcast(t) is t and comm.all_gather(t) == [t]
    assert comm.broadcast_object({"a": 1}) == {"a": 1} and comm.all_gather_object(5) == [5]
    comm.shutdown()                                  # no job: nothing to end
    assert comm.device_for() == torch.device("cpu") and comm.device_for(prefer="meta") == torch.device("meta")
    with pytest.raises(ValueError, match="op must be"):
        comm.all_reduce(t, "mean")
    with pytest.raises(OSError, match="disk"):      # one process: the error itself, not a RankFailure
        with comm.together("writing"):
            raise OSError("disk")


# ------------------------------------------------------------------------------------------ the paths
def _mixer(data_dir: str, strategy: str, *extra: str):
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer

    cfg = MegamixConfig.from_yaml(None, overrides=[
        f"data.data_dir={data_dir}", "model.seq_len=12", "train.global_batch_size=8", "train.micro_batch_size=2",
        "projection.k1=8", "projection.k2=4", f"mixing.strategy={strategy}", "mixing.update_every=1",
        "mixing.min_weight=0", *extra]).validate()
    return Mixer(cfg, TokenStore(Path(data_dir) / "tokens"), rank=comm.rank(), world_size=WORLD)


def _head(V=256, d=16):
    torch.manual_seed(0)
    return torch.nn.Embedding(V, d), torch.nn.Linear(d, V, bias=False)


def _fused_step(mixer, hidden_fn=None, lm_head_weight=None):
    """One micro-batch through the fused loss (tokens folded into a 256-row head), then Mixer.step(0)."""
    emb, head = _head()
    for batch in mixer.next_step()[:1]:
        labels = batch.labels % 256
        labels[batch.labels < 0] = -100
        mixer.lm_head_loss(emb(batch.input_ids % 256), head.weight, labels, batch.domain_ids,
                           batch.sample_ids).backward()
    kw = {}
    if hidden_fn is not None:
        kw = {"hidden_fn": lambda b: emb(b.input_ids % 256).detach(), "lm_head_weight": head.weight.detach()}
    return mixer.step(0, **kw)


def _mixer_cfg_for_backend():
    from megamix.config import MegamixConfig

    return MegamixConfig.from_yaml(None, overrides=["train.device=cpu"]).validate()


def _bare_backend(rank: int, world: int):
    """A data-parallel backend over a tiny model for the checkpoints and the guard: its collectives (any, mean,
    step_report, barrier) are megamix's own, through megamix.comm; rank 0 writes the model file, as DDP does."""
    from megamix.train.backend import PlainBackend

    class Bare(PlainBackend):
        def save(self, root, tag):
            if self.rank == 0:
                super().save(root, tag)

    b = Bare(rank, world)
    model = torch.nn.Linear(4, 4)
    b.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3), lambda s: 1e-3, _mixer_cfg_for_backend())
    return b


def _paths(data_dir: str, root: str) -> dict:
    """Every path that communicates, as name -> zero-argument callable (each builds what it needs)."""
    from megamix.integrations.hf_trainer import MegamixFeed
    from megamix.regroup.core import regroup
    from megamix.train.checkpoint import Checkpoints

    def mixer_step_rnb():
        _fused_step(_mixer(data_dir, "rnb"))

    def dograph_reservoir_and_clusters():
        m = _mixer(data_dir, "dograph", "mixing.dograph_reservoir=4")
        _fused_step(m)
        _fused_step(m)       # the second round: clusters exist, reweighting and the cluster broadcast

    def held_out_gradient():
        _fused_step(_mixer(data_dir, "rnb", "mixing.eval_grad_batches=1"), hidden_fn=True)

    def nonfinite_guard():
        b = _bare_backend(comm.rank(), WORLD)
        r = b.step_report(torch.tensor(float("nan")), torch.tensor(float("inf")), False)
        assert r.loss != r.loss and not r.grads_finite and not r.stop

    def deepspeed_backend():
        """The DeepSpeed backend's own collectives (its engine's are DeepSpeed's): the step report, the
        finiteness check before a checkpoint."""
        from megamix.train.backend import DeepSpeedBackend

        b = DeepSpeedBackend(comm.rank(), WORLD)
        b.model = torch.nn.Linear(4, 4)
        r = b.step_report(torch.tensor(1.0), None, False)
        assert b.params_finite() and r.loss == 1.0 and r.grads_finite and r.grad_norm is None

    def checkpoints():
        b = _bare_backend(comm.rank(), WORLD)
        cfg = _mixer_cfg_for_backend()
        m = _mixer(data_dir, "rnb")
        ck = Checkpoints(Path(root) / "ckpt")
        ck.save(1, b, m, cfg)
        assert Checkpoints(Path(root) / "ckpt").load(b, m, cfg) == 1

    def hf_feed():
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50257, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32))
        m = _mixer(data_dir, "rnb")
        feed = MegamixFeed(model, m)
        for inputs in feed.micro_batches()[:1]:
            model(**inputs).loss.backward()
        feed.step(0)
        feed.remove()

    def regroup_two_ranks():
        regroup(Path(root) / "corpus_src", Path(root) / "regrouped", [2, 3], embedder="hashing", embed_batch=4,
                kmeans_batch=8, fit_docs=40, tokenize=False, plot=False, progress=False, rank=comm.rank(),
                world_size=WORLD)

    return {"mixer_step_rnb": mixer_step_rnb, "dograph_reservoir_and_clusters": dograph_reservoir_and_clusters,
            "held_out_gradient": held_out_gradient, "nonfinite_guard": nonfinite_guard,
            "deepspeed_backend": deepspeed_backend, "checkpoints": checkpoints,
            "hf_trainer_accelerate_feed": hf_feed, "regroup": regroup_two_ranks}


def _fake_corpus(root: Path) -> None:
    from test_regroup_kmeans import _fake_corpus as three_domains   # the regroup tests' toy corpus

    three_domains(root, per=20)


# ------------------------------------------------------------------------------------------ cuda:gloo = NCCL's rule
def _cuda_gloo_worker(rank: int, port: int, data_dir: str, root: str) -> None:
    _setup_rank(rank, port)
    import torch.distributed as dist

    dist.init_process_group("cuda:gloo", rank=rank, world_size=WORLD)
    out = {}
    for name, run in _paths(data_dir, root).items():
        try:
            run()
            out[name] = "completed"
        except BaseException as e:  # noqa: BLE001 - the kind of failure is what is checked
            out[name] = f"{type(e).__name__}: {e}"
    Path(root, f"cuda_gloo_rank{rank}.json").write_text(json.dumps(out))


def test_every_path_hands_nccl_device_tensors(tiny_store, tmp_path):
    """On a group that, like NCCL, has no CPU backend, every path fails asking for CUDA (absent on this machine),
    never with the CPU-backend error; the device choice is megamix.comm's."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU this would run for real: the GPU acceptance script covers it")
    _fake_corpus(tmp_path / "corpus_src")
    spawn(_cuda_gloo_worker, (_free_port(), str(tiny_store.parent), str(tmp_path)), WORLD)
    for r in range(WORLD):
        res = json.loads((tmp_path / f"cuda_gloo_rank{r}.json").read_text())
        assert set(res) == set(_paths("x", "y")), res
        for name, what in res.items():
            assert CPU_BACKEND not in what, f"rank {r}, {name}: a CPU tensor reached the NCCL-like group: {what}"
            assert any(m in what for m in CUDA_MISSING), f"rank {r}, {name}: {what}"


# ------------------------------------------------------------------------------------------ the recorder
def _install_recorder(records: list) -> None:
    import torch.distributed as dist

    for name in COLLECTIVES:
        orig = getattr(dist, name, None)
        if orig is None:
            continue

        def wrapper(*args, __orig=orig, __name=name, **kwargs):
            frames = traceback.extract_stack()[:-1]
            caller = next((f for f in reversed(frames) if "/torch/distributed/" not in f.filename), None)
            group = kwargs.get("group")
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            served = comm._device_types(group)
            records.append({"op": __name, "file": caller.filename if caller else "?",
                            "line": caller.lineno if caller else 0,
                            "devices": sorted({t.device.type for t in tensors}), "served": served,
                            "src": kwargs.get("src", args[1] if __name in ("broadcast", "broadcast_object_list")
                                              and len(args) > 1 else None),
                            "group_src": kwargs.get("group_src")})
            return __orig(*args, **kwargs)

        setattr(dist, name, wrapper)


def _recorder_worker(rank: int, port: int, data_dir: str, root: str) -> None:
    _setup_rank(rank, port)
    records: list = []
    _install_recorder(records)
    from megamix.config import MegamixConfig
    from megamix.train.loop import train

    def cfg(out, *extra):
        return MegamixConfig.from_yaml(None, overrides=[
            f"data.data_dir={data_dir}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.seq_len=16",
            "train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0",
            "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=1", f"train.out_dir={out}",
            "train.threads=1", "projection.k1=8", "projection.k2=4", "mixing.update_every=1",
            "logging.tensorboard=false", *extra]).validate()

    # the DeepSpeed backend: R&B with held-out gradients, checkpoints, then a resume that reads them
    ds = ("deepspeed.enabled=true", "deepspeed.zero_stage=1", "mixing.strategy=rnb", "mixing.eval_grad_batches=1")
    train(cfg(f"{root}/ds", *ds), rank=rank, world_size=WORLD, progress=False, log_to_stdout=False)
    train(cfg(f"{root}/ds", *ds, "train.steps=3"), rank=rank, world_size=WORLD, progress=False, log_to_stdout=False)
    # the DDP backend: DoGraph (reservoir and cluster broadcast) with the non-finite guard skipping
    train(cfg(f"{root}/ddp", "mixing.strategy=dograph", "mixing.dograph_reservoir=8", "train.on_nonfinite=skip",
              "train.steps=3"), rank=rank, world_size=WORLD, progress=False, log_to_stdout=False)
    # the feed of the HF Trainer / Accelerate, the checkpoints and guard on their own, regroup
    paths = _paths(data_dir, root)
    for name in ("hf_trainer_accelerate_feed", "checkpoints", "nonfinite_guard", "deepspeed_backend", "regroup"):
        paths[name]()
    comm.shutdown()                       # the job's end: a barrier (recorded, through comm), then no group left
    assert not comm.active()
    comm.shutdown()                       # and again: a no-op
    Path(root, f"records_rank{rank}.json").write_text(json.dumps(records))


def test_every_collective_megamix_issues_goes_through_comm_on_a_served_device(tiny_store, tmp_path):
    pytest.importorskip("deepspeed")
    _fake_corpus(tmp_path / "corpus_src")
    spawn(_recorder_worker, (_free_port(), str(tiny_store.parent), str(tmp_path)), WORLD)
    for r in range(WORLD):
        records = json.loads((tmp_path / f"records_rank{r}.json").read_text())
        ours = [x for x in records if "/megamix/" in x["file"] or "/kernels/" in x["file"]]
        assert len(ours) > 20, len(ours)
        bypass = [x for x in ours if not x["file"].endswith("megamix/comm.py")]
        assert not bypass, f"collectives issued outside megamix.comm: {bypass[:5]}"
        wrong = [x for x in ours if not set(x["devices"]) <= set(x["served"])]
        assert not wrong, f"tensors on a device the group does not serve: {wrong[:5]}"
        global_src = [x for x in ours if x["op"] in ("broadcast", "broadcast_object_list")
                      and (x["src"] is not None or x["group_src"] != 0)]
        assert not global_src, f"a broadcast with a global src: {global_src[:5]}"
        ops = {x["op"] for x in ours}
        assert {"all_reduce", "all_gather", "broadcast", "all_gather_object", "broadcast_object_list"} <= ops, ops


# ------------------------------------------------------------------------------------------ failures reach every rank
@contextlib.contextmanager
def _full_disk_on_rank0(module, name: str, filename: str, rank: int):
    """``module.name(path, text)`` (an atomic writer) raises ENOSPC on rank 0 for a file called ``filename``, and so
    does every loaded megamix module's binding of the same function (``megamix.io`` owns it; others import it), so
    the failure does not depend on which module the writing code imported it from."""
    import sys

    real = getattr(module, name)

    def broken(path, text, **kw):
        if rank == 0 and Path(path).name == filename:
            raise OSError(28, "No space left on device", str(path))
        return real(path, text, **kw)

    holders = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("megamix") and getattr(m, name, None) is real]
    for m in holders:
        setattr(m, name, broken)
    try:
        yield
    finally:
        for m in holders:
            setattr(m, name, real)


def _failure_worker(rank: int, port: int, data_dir: str, root: str) -> None:
    _setup_rank(rank, port)
    import datetime

    import torch.distributed as dist

    import megamix.io
    from megamix.train import checkpoint as ck_mod

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    out = {}

    def attempt(name, run):
        t0 = time.time()
        try:
            run()
            out[name] = {"error": None}
        except BaseException as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}", "seconds": time.time() - t0}

    # 1. plain `together`: rank 0 fails, rank 1 has nothing to do
    def plain():
        with comm.together("writing a file"):
            if rank == 0:
                raise OSError(28, "No space left on device", "/full/disk/file")
    attempt("together", plain)

    # 2. a checkpoint whose `latest` cannot be written on rank 0
    def checkpoint():
        with _full_disk_on_rank0(ck_mod, "atomic_write_text", "latest", rank):
            b = _bare_backend(rank, WORLD)
            ck_mod.Checkpoints(Path(root) / "ckpt").save(1, b, _mixer(data_dir, "rnb"), _mixer_cfg_for_backend())
    attempt("checkpoint", checkpoint)

    # 3. regroup: rank 0 fails while writing the regrouped corpus
    def regroup_write():
        from megamix.regroup import core

        real = core.write_regrouped

        def broken(*a, **k):
            raise PermissionError(13, "Permission denied", str(Path(root) / "regrouped" / "corpus"))

        core.write_regrouped = broken if rank == 0 else real
        try:
            core.regroup(Path(root) / "corpus_src", Path(root) / "regrouped", [2, 3], embedder="hashing",
                         embed_batch=4, kmeans_batch=8, fit_docs=40, tokenize=False, plot=False, progress=False,
                         rank=rank, world_size=WORLD)
        finally:
            core.write_regrouped = real
    attempt("regroup", regroup_write)

    # 4. the run's start-up files (train.out_dir's config.yaml) cannot be written on rank 0
    def startup():
        from megamix.config import MegamixConfig
        from megamix.train.loop import train

        with _full_disk_on_rank0(megamix.io, "atomic_write_text", "config.yaml", rank):
            cfg = MegamixConfig.from_yaml(None, overrides=[
                f"data.data_dir={data_dir}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                "model.seq_len=16", "train.steps=1", "train.global_batch_size=8", "train.micro_batch_size=2",
                f"train.out_dir={root}/run", "train.threads=1", "projection.k1=8", "projection.k2=4",
                "logging.tensorboard=false"]).validate()
            train(cfg, rank=rank, world_size=WORLD, progress=False, log_to_stdout=False)
    attempt("startup", startup)
    dist.barrier()
    Path(root, f"failures_rank{rank}.json").write_text(json.dumps(out))


def test_rank_zero_failures_stop_every_rank_with_the_same_line(tiny_store, tmp_path):
    _fake_corpus(tmp_path / "corpus_src")
    t0 = time.time()
    spawn(_failure_worker, (_free_port(), str(tiny_store.parent), str(tmp_path)), WORLD)
    assert time.time() - t0 < 240
    res = [json.loads((tmp_path / f"failures_rank{r}.json").read_text()) for r in range(WORLD)]
    for name in ("together", "checkpoint", "regroup", "startup"):
        errors = [r[name]["error"] for r in res]
        assert errors[0] is not None and errors[0] == errors[1], (name, errors)
        assert errors[0].startswith("RankFailure: rank 0 of 2 failed"), (name, errors[0])
        assert "\n" not in errors[0]
        assert all(r[name]["seconds"] < 30 for r in res), (name, [r[name]["seconds"] for r in res])
    assert "No space left on device" in res[1]["checkpoint"]["error"]
    assert not (tmp_path / "ckpt" / "latest").exists()
    assert "Permission denied" in res[1]["regroup"]["error"]

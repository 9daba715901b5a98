"""megamix on a real megatron-core ``GPTModel`` (local, non-Transformer-Engine layer spec) on CPU.

Skipped unless ``megatron.core`` imports. Tested with megatron-core 0.16.1 installed without its
dependencies (``pip install --no-deps megatron-core==0.16.1``; torch 2.13 CPU, no apex, no Transformer
Engine). Two CPU shims are needed, both set up in :func:`_cpu_shims`: Megatron's attention allocates its
score buffer with ``torch.cuda.current_device()``, and forks a CUDA RNG state for attention dropout.

The code blocks of examples/megatron_pretrain_gpt_patch.md (sections 1, 2, 3a, 3b) are executed as they
are written there; only ``get_batch`` is replaced by a CPU version (the example moves tensors with
``.cuda()``), and Megatron-LM's ``loss_func`` / ``unwrap_model`` by their core lines.

Two gloo ranks run, in one spawn:
- TP=2, tied embeddings: the example's two paths, each through Megatron's own ``forward_step_calc_loss``:
  3a, Megatron's loss with ``attach_megatron`` (capture), against 3b, the ``MegamixGPTModel`` fork whose
  ``_postprocess`` calls ``vocab_parallel_lm_head_loss`` with ``megamix_loss_func``: same loss, same
  gradient for *every* parameter, same statistics, identical on both TP ranks. (Megatron's
  ``forward_backward_no_pipelining`` itself allocates on ``"cuda"``, so the schedule is not run whole.)
- TP=1 (each rank alone), untied: ``attach(model, mixer)`` recognises ``output_layer`` as ``[s, b, h]`` and
  its per-sample rows equal an exact per-sample reference (seq_len == micro-batch).
"""
from __future__ import annotations

import os
import re
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ranks import free_port as _free_port, spawn

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install --no-deps megatron-core)")

VOCAB, VOCAB_PAD, HIDDEN, SEQ, MICRO = 61, 64, 16, 8, 8
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "megatron_pretrain_gpt_patch.md"
CONFIG_YAML = """\
data: {{data_dir: {data_dir}}}
model: {{seq_len: 8}}
train: {{global_batch_size: 8, micro_batch_size: 8}}
projection: {{k1: 4, k2: 3, k: 5, backend: torch}}
mixing: {{strategy: dograph-sample}}
"""



def _cpu_shims() -> None:
    """Let megatron-core's local layers run on CPU: a global memory buffer that allocates on the CPU, and
    Megatron's documented no-op RNG tracker (the inference tracker; there is no dropout here)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.utils import GlobalMemoryBuffer

    class CpuMemoryBuffer(GlobalMemoryBuffer):
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            return torch.empty(*tensor_shape, dtype=dtype)

    parallel_state._GLOBAL_MEMORY_BUFFER = CpuMemoryBuffer()
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _example_blocks() -> dict[str, str]:
    """The python code blocks of the example, joined per section (keys "1", "2", "3a", "3b", ...)."""
    text = EXAMPLE.read_text()
    blocks: dict[str, str] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        key = section.split(".", 1)[0]
        blocks[key] = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    return blocks


def _example_namespace(sections: tuple[str, ...], store_dir: str) -> dict:
    """Execute the example's sections in a fresh namespace, with stand-ins for what it takes from
    Megatron-LM's training scripts; ``build_mixer`` (section 1) has run."""
    from megatron.core.models.gpt import GPTModel

    ns = {"__name__": "megatron_example", "torch": torch, "partial": partial, "GPTModel": GPTModel,
          "loss_func": _megatron_loss_func, "unwrap_model": lambda m: m}
    blocks = _example_blocks()
    for key in sections:
        exec(compile(blocks[key], f"{EXAMPLE.name}#{key}", "exec"), ns)
    ns["get_batch"] = _cpu_get_batch
    cfg_path = os.path.join(os.path.dirname(store_dir), f"megamix_{os.getpid()}.yaml")
    with open(cfg_path, "w") as f:
        f.write(CONFIG_YAML.format(data_dir=os.path.dirname(store_dir)))
    ns["build_mixer"](SimpleNamespace(megamix_config=cfg_path, global_batch_size=MICRO, micro_batch_size=MICRO,
                                      seq_length=SEQ))
    return ns


def _cpu_get_batch(data_iterator):
    """The example's ``get_batch`` on CPU: the same outputs, ids folded into the model's small vocabulary."""
    batch = next(data_iterator)
    tokens, labels, loss_mask, position_ids, attention_mask = _inputs(batch)
    return tokens, labels, loss_mask, attention_mask, position_ids, batch


def _gpt(model_class, tp: int, tied: bool):
    """A tiny ``model_class`` (a GPTModel; 2 layers, local spec) built on CPU; the same weights for the
    same TP size."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
                            hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp)
    return model_class(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB_PAD,
                       max_sequence_length=SEQ, share_embeddings_and_output_weights=tied)


def _mixer(store_dir: str):
    from megamix.config import MegamixConfig
    from megamix.data.store import TokenStore
    from megamix.mixer import Mixer
    path = os.path.join(os.path.dirname(store_dir), f"megamix_tp1_{os.getpid()}.yaml")
    with open(path, "w") as f:
        f.write(CONFIG_YAML.format(data_dir=os.path.dirname(store_dir)))
    return Mixer(MegamixConfig.from_yaml(path).validate(), TokenStore(store_dir))


def _inputs(batch):
    """Megatron's inputs for a megamix micro-batch folded into the small vocabulary (labels < VOCAB, so
    padded rows are never targets); loss_mask 0 on a few tokens."""
    ids = batch.input_ids % VOCAB
    labels = batch.labels % VOCAB
    loss_mask = torch.ones(MICRO, SEQ)
    loss_mask[0, :3] = 0
    loss_mask[5, -2:] = 0
    position_ids = torch.arange(SEQ).expand(MICRO, SEQ)
    causal = torch.ones(1, 1, SEQ, SEQ).tril() < 0.5          # True = masked
    return ids, labels, loss_mask, position_ids, causal


def _stats(mixer) -> dict:
    snap = mixer.stats.snapshot(1, mixer.domains)
    return {"sums": torch.as_tensor(snap.sums), "per_sample": torch.as_tensor(snap.per_sample),
            "domain_loss": torch.as_tensor(snap.domain_loss)}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _megatron_loss_func(loss_mask, output_tensor):
    """Megatron-LM's ``pretrain_gpt.loss_func`` (its core lines): the masked sum and the token count."""
    loss = torch.sum(output_tensor.float().view(-1) * loss_mask.view(-1))
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def _schedule_backward(model, output_tensor, loss_func) -> torch.Tensor:
    """The tail of Megatron's schedule for one micro-batch: ``forward_step_calc_loss`` (loss_func, then
    ÷ num_tokens ÷ num_microbatches), then backward. Returns the loss it backpropagated."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    loss, _ = forward_step_calc_loss(model, output_tensor, loss_func, model.config, None, False, 1, [],
                                     cp_group_size=1, is_last_stage=True)
    loss.backward()
    return loss.detach()


def _tp2_capture_vs_fused(store_dir: str) -> dict:
    """TP=2, tied: the example's 3a (Megatron's loss + attach_megatron) and 3b (the fused fork), each with
    its own Mixer from section 1, on the same model, weights and batch."""
    fused_ns = _example_namespace(("1", "2", "3b"), store_dir)
    capture_ns = _example_namespace(("1", "2", "3a"), store_dir)
    model = _gpt(fused_ns["MegamixGPTModel"], 2, tied=True)     # megamix unbound: Megatron's own loss
    out = {}
    capture_ns["attach_megamix"]([model])
    output_tensor, loss_fn = capture_ns["forward_step"](capture_ns["megamix_iterator"](), model)
    loss = _schedule_backward(model, output_tensor, loss_fn)
    hook = capture_ns["HOOK"]
    hook.remove()
    out["capture"] = {"loss": loss, "grads": _grads(model), "stats": _stats(capture_ns["MIXER"]),
                      "seq_first": hook.seq_first}
    model.zero_grad(set_to_none=True)
    output_tensor, loss_fn = fused_ns["forward_step"](fused_ns["megamix_iterator"](), model)
    loss = _schedule_backward(model, output_tensor, loss_fn)
    out["fused"] = {"loss": loss, "grads": _grads(model), "stats": _stats(fused_ns["MIXER"])}
    return out


def _tp1_attach_exact(store_dir: str) -> dict:
    """TP=1, untied: attach(model, mixer) rows against the exact per-sample projected gradients."""
    from megamix.integrations import attach

    from megatron.core.models.gpt import GPTModel

    model = _gpt(GPTModel, 1, tied=False)
    mixer = _mixer(store_dir)
    batch = mixer.next_step()[0]
    ids, labels, loss_mask, pos, causal = _inputs(batch)
    hook = attach(model, mixer)
    seen = {}

    def keep_input(module, args, output):
        seen["hidden"] = args[0].detach()

    model.output_layer.register_forward_hook(keep_input)
    hook.set_batch(batch)
    per_token = model(ids, pos, causal, labels=labels)
    ((per_token * loss_mask).sum() / loss_mask.sum()).backward()
    hook.remove()
    a = seen["hidden"].transpose(0, 1)                                    # [b, s, h]
    W = model.output_layer.weight.detach()
    delta = torch.softmax(a @ W.t(), dim=-1)
    delta.scatter_add_(-1, labels[..., None], -torch.ones_like(labels[..., None], dtype=delta.dtype))
    delta *= (loss_mask / loss_mask.sum())[..., None]
    G = torch.einsum("bsv,bsd->bvd", delta.double(), a.double())           # exact per-sample LM-head gradients
    proj = mixer.head.projection
    exact = proj.finalize(torch.einsum("kv,bvd,ld->bkl", proj.P1.double(), G, proj.P2.double()).reshape(MICRO, -1))
    return {"rows": _stats(mixer)["per_sample"], "exact": exact * mixer.head.grad_scale,
            "seq_first": hook.seq_first, "is_output_layer": hook.lm_head is model.output_layer}


def _worker(rank: int, world: int, port: int, out_dir: str, store_dir: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        _cpu_shims()
        res = {"tp2": _tp2_capture_vs_fused(store_dir)}
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        _cpu_shims()
        res["tp1"] = _tp1_attach_exact(store_dir)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def megatron_runs(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_core")
    spawn(_worker, (2, _free_port(), str(out), str(tiny_store)), 2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_gpt_model_attach_detects_seq_first_and_rows_are_exact(megatron_runs):
    from megamix.kernels.testing import assert_close
    for rank, res in enumerate(megatron_runs):
        r = res["tp1"]
        assert r["seq_first"] and r["is_output_layer"]
        assert r["rows"].shape == (MICRO, 5)                         # projection.k = 5: finalize applied
        assert_close(r["rows"], r["exact"], "proj", torch.float32, "cpu", f"rank{rank} per-sample rows")


def test_gpt_model_tp2_fused_fork_equals_megatron_loss_and_capture(megatron_runs):
    from megamix.kernels.testing import assert_close
    for rank, res in enumerate(megatron_runs):
        cap, fused = res["tp2"]["capture"], res["tp2"]["fused"]
        assert cap["seq_first"]
        assert_close(fused["loss"], cap["loss"], "loss", torch.float32, "cpu", f"rank{rank} loss")
        assert fused["grads"].keys() == cap["grads"].keys() and len(cap["grads"]) > 10
        for name, g in cap["grads"].items():                          # the whole model, through the reduced dX
            assert_close(fused["grads"][name], g, "grad", torch.float32, "cpu", f"rank{rank} grad {name}")
        for key in ("sums", "per_sample", "domain_loss"):
            quantity = "loss" if key == "domain_loss" else "proj"
            assert_close(fused["stats"][key], cap["stats"][key], quantity, torch.float32, "cpu", f"rank{rank} {key}")
    for path in ("capture", "fused"):                                 # TP ranks hold identical statistics
        for key, value in megatron_runs[0]["tp2"][path]["stats"].items():
            assert torch.equal(value, megatron_runs[1]["tp2"][path]["stats"][key]), (path, key)

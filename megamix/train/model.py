"""The model of the training loop: the built-in GPT-2, or any Hugging Face causal LM (``model.hf_config``).

- :func:`resolve_hf_config` turns the ``model`` section into a transformers config: GPT-2 from
  ``n_layer``/``n_embd``/``n_head`` when ``model.hf_config`` is empty; otherwise a local folder with
  ``config.json``, a config name found in the local Hugging Face cache (runs are offline), or an inline
  architecture dict built with ``transformers.AutoConfig.for_model``.
- :func:`build_model` builds it with seeded random init (every rank builds the same weights), then
  optionally loads ``model.init_from``, turns on gradient checkpointing and compiles the body.
- :func:`model_inputs` gives the forward's keyword arguments for a loader batch, including the
  block-diagonal (document) attention mask of ``model.doc_masking``.
- :func:`count_parameters` / :func:`count_config_parameters` (the latter on the meta device, nothing allocated).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megamix.config import ModelConfig
from megamix.configbase import ConfigError

#: keys an inline ``model.hf_config`` may hold besides the config class's own fields (transformers converts
#: the legacy RoPE keys into ``rope_parameters``).
_LEGACY_KEYS = {"rope_theta", "rope_scaling", "attn_implementation"}


# ------------------------------------------------------------------------------------------- config
def _first_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' validation errors span several)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text[:400] + " ...") if len(text) > 400 else (text or type(e).__name__)


def _inline_config(spec: dict, cfg: ModelConfig):
    from transformers import AutoConfig

    spec = dict(spec)
    model_type = spec.pop("model_type")
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError:
        raise ConfigError(f"model.hf_config.model_type={model_type!r} is not a model type transformers knows; "
                          "use e.g. llama, qwen2, qwen3, mistral or gpt2") from None
    known = set(default.to_dict()) | set(getattr(type(default), "attribute_map", {})) | _LEGACY_KEYS
    if dataclasses.is_dataclass(type(default)):
        known |= {f.name for f in dataclasses.fields(type(default))}
    for key in spec:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.hf_config.{key} is not a field of transformers' {type(default).__name__}.{hint}")
    if explicit_vocab(cfg) is not None:
        spec.setdefault("vocab_size", cfg.vocab_size)
    if "max_position_embeddings" not in spec and "n_positions" not in spec:
        npos = getattr(default, "max_position_embeddings", None)
        if npos is not None and npos < cfg.seq_len:
            spec["max_position_embeddings"] = cfg.seq_len
    try:
        return AutoConfig.for_model(model_type, **spec)
    except Exception as e:  # transformers' own validation (e.g. heads not dividing the hidden size)
        raise ConfigError(f"model.hf_config: {_first_line(e)}") from None


def _named_config(spec: str):
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.hf_config={spec} is a file; point it to the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.hf_config={spec} is a folder without config.json (a Hugging Face "
                              "save_pretrained folder has one)")
        source = str(path)
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ConfigError(f"model.hf_config={spec}: no such folder")
    else:
        source = spec
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except OSError:
        raise ConfigError(
            f"model.hf_config={spec!r} is neither a local folder nor a config in the local Hugging Face cache "
            "(megamix runs offline, HF_HUB_OFFLINE=1): fetch it once on a machine with network access "
            f"(`hf download {spec} config.json`), or set model.hf_config to a folder with config.json or to an "
            "inline architecture {model_type: ..., ...}") from None
    except ValueError as e:
        raise ConfigError(f"model.hf_config={spec!r}: {_first_line(e)} (megamix never runs remote code; use an "
                          "architecture transformers ships)") from None


GPT2_VOCAB = 50257   # GPT-2's BPE: the built-in model's vocabulary when model.vocab_size=auto meets no data


def explicit_vocab(cfg: ModelConfig) -> int | None:
    """``model.vocab_size`` when the user set a number, None for ``auto``."""
    return None if cfg.vocab_size == "auto" else int(cfg.vocab_size)


def hf_vocab(cfg: ModelConfig) -> int | None:
    """The vocabulary ``model.hf_config`` itself names (a folder's or cached config, or an inline one with
    vocab_size), or None (the built-in GPT-2, or an inline architecture without vocab_size)."""
    spec = cfg.hf_config
    if spec in ("", {}, None) or (isinstance(spec, dict) and "vocab_size" not in spec):
        return None
    return int(spec["vocab_size"]) if isinstance(spec, dict) else int(_named_config(str(spec)).vocab_size)


def resolve_vocab(cfg: ModelConfig, store) -> tuple[int, str]:
    """``(vocabulary size, where it came from)`` for a run over ``store``: ``model.vocab_size`` when set, else the
    HF config's, the tokenizer's (the store's manifest), or the store's largest token id + 1. The store is checked
    against the result by the caller (``TokenStore.check_vocab``)."""
    if explicit_vocab(cfg) is not None:
        return explicit_vocab(cfg), "model.vocab_size"
    v = hf_vocab(cfg)
    if v is not None:
        return v, "model.hf_config"
    if store.vocab_size is not None:
        return int(store.vocab_size), f"the tokenizer of the token data ({store.tokenizer or 'recorded'})"
    hi = store.max_token_id
    if hi is None:
        raise ConfigError("model.vocab_size=auto: the token data records neither its tokenizer's vocabulary nor its "
                          "largest token id; set model.vocab_size explicitly")
    return max(int(hi) + 1, 256), "the token data's largest token id + 1"


def resolve_hf_config(cfg: ModelConfig):
    """The transformers config ``cfg`` describes (see the module docstring). Raises ConfigError."""
    from transformers import GPT2Config

    spec = cfg.hf_config
    if spec in ("", {}, None):
        vocab = explicit_vocab(cfg) or GPT2_VOCAB
        eos = GPT2_VOCAB - 1 if vocab >= GPT2_VOCAB else None    # GPT-2's <|endoftext|>; not in a smaller vocabulary
        hf = GPT2Config(vocab_size=vocab, n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eos, eos_token_id=eos)
    elif isinstance(spec, dict):
        hf = _inline_config(spec, cfg)
    else:
        hf = _named_config(str(spec))
    if getattr(hf, "is_encoder_decoder", False):
        raise ConfigError(f"model.hf_config: {type(hf).__name__} is an encoder-decoder; megamix pretrains "
                          "decoder-only causal LMs")
    if explicit_vocab(cfg) is not None and hf.vocab_size != cfg.vocab_size:
        raise ConfigError(f"model.hf_config has vocab_size={hf.vocab_size} but model.vocab_size={cfg.vocab_size}; "
                          f"set model.vocab_size={hf.vocab_size} or auto (the token store's ids must be below it)")
    npos = getattr(hf, "max_position_embeddings", None)
    if isinstance(npos, int) and npos < cfg.seq_len:
        raise ConfigError(f"model.seq_len={cfg.seq_len} exceeds the HF config's max_position_embeddings={npos}; "
                          "lower model.seq_len or raise max_position_embeddings")
    return hf


def check_attn_implementation(name: str, *, cuda: bool | None = None) -> None:
    """Refuse an attention implementation this machine cannot run (one-line ConfigError)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "flash_attention_2":
        if not cuda:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA GPU (flash-attn has no CPU "
                              "kernels); use model.attn_implementation=sdpa (the default) or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn --no-build-isolation); or use sdpa")


# ------------------------------------------------------------------------------------------- build
def _instantiate(hf, attn: str, seed: int, device: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(hf, attn_implementation=attn, dtype=torch.float32)
    except ValueError as e:
        raise ConfigError(f"model.hf_config: transformers has no causal-LM class for {type(hf).__name__} "
                          f"({_first_line(e)})") from None
    finally:
        torch.random.set_rng_state(state)


def build_model(cfg: ModelConfig, seed: int, *, load_init: bool = True) -> nn.Module:
    """The model of ``cfg``, randomly initialised with ``seed`` (identical on every rank), fp32.

    Then, as configured: weights from ``model.init_from`` (:func:`load_weights`; not with ``load_init=False``, as
    when a run resumes from a checkpoint, whose weights replace them anyway), gradient checkpointing
    (non-reentrant), and ``torch.compile`` of the body (``model.base_model.compile()``, in place, so parameter
    names and the fused LM-head patch are unchanged)."""
    hf = resolve_hf_config(cfg)
    check_attn_implementation(cfg.attn_implementation)
    model = _instantiate(hf, cfg.attn_implementation, seed)
    if cfg.init_from and load_init:
        load_weights(model, cfg.init_from)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; set "
                              "model.gradient_checkpointing=false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        model.base_model.compile()
    return model


# ------------------------------------------------------------------------------------------- init_from
def _checkpoint_files(path: Path) -> tuple[str, list[Path]]:
    """(kind, files) of the weights at ``path``: 'torch' (megamix model.pt), 'deepspeed' (engine module
    states), 'safetensors' or 'bin' (HF save_pretrained, possibly sharded)."""
    if path.is_file():
        return ("safetensors" if path.suffix == ".safetensors" else "torch"), [path]
    if (path / "model.pt").is_file():
        return "torch", [path / "model.pt"]
    ds = sorted(path.glob("mp_rank_*_model_states.pt"))
    if ds:
        return "deepspeed", ds[:1]
    for index, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return kind, [path / s for s in shards]
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (path / name).is_file():
            return kind, [path / name]
    raise ConfigError(f"model.init_from={path}: no weights found (expected a Hugging Face save_pretrained folder "
                      "with model.safetensors, a megamix checkpoint folder with model.pt, or a model.pt file)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (see :func:`load_weights` for the accepted forms), on the CPU."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"model.init_from={path}: no such file or folder")
    kind, files = _checkpoint_files(path)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if kind == "safetensors":
            from safetensors.torch import load_file

            out.update(load_file(str(f), device="cpu"))
            continue
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"model.init_from={f}: cannot read it as a torch checkpoint ({_first_line(e)})") from None
        if kind == "torch" and isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]           # megamix plain-backend checkpoint: {"model", "optimizer", ...}
        elif kind == "deepspeed" and isinstance(obj, dict) and isinstance(obj.get("module"), dict):
            obj = obj["module"]          # DeepSpeed engine checkpoint (ZeRO 0-2 hold the full module)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConfigError(f"model.init_from={f} does not hold a model state dict")
        out.update(obj)
    if kind == "deepspeed" and out and all(v.numel() == 0 for v in out.values()):
        raise ConfigError(f"model.init_from={path} is a ZeRO-3 checkpoint whose parameters are partitioned; "
                          "consolidate it first with DeepSpeed's zero_to_fp32.py and point init_from to the result")
    return out


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy a checkpoint's weights into ``model`` (strict: every tensor must be present, with the same shape).

    Accepted: a Hugging Face ``save_pretrained`` folder (``model.safetensors``, sharded or not, or
    ``pytorch_model.bin``), a megamix checkpoint folder ``checkpoints/step_XXXXXXX`` (``model.pt`` of the
    plain backend, or the engine's module states of DeepSpeed ZeRO 0-2), or a ``model.pt`` / ``.safetensors``
    file. Tied weights may be stored once. Raises ConfigError naming the mismatched tensors."""
    sd = read_state_dict(path)
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not any(k in own for k in sd) and any(f"{prefix}.{k}" in own for k in sd):
        sd = {f"{prefix}.{k}": v for k, v in sd.items()}      # a checkpoint of the bare body
    ignore = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    unexpected = [k for k in sd if k not in own and not any(re.search(p, k) for p in ignore)]
    by_storage: dict[int, list[str]] = {}
    for k, t in own.items():
        by_storage.setdefault(id(t), []).append(k)
    missing = [k for k in own if k not in sd and not any(alias in sd for alias in by_storage[id(own[k])])]
    shape = [f"{k} {list(sd[k].shape)} in the checkpoint vs {list(own[k].shape)} in the model"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if shape:
        problems.append(f"{len(shape)} tensor(s) differ in shape, e.g. {shape[0]}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) are not in the model, e.g. {unexpected[0]}")
    if problems:
        raise ConfigError(f"model.init_from={path} does not match the model built from the model section "
                          f"({type(model).__name__}): {'; '.join(problems)}. Build the checkpoint's architecture "
                          "(model.hf_config, model.vocab_size, ...)")
    with torch.no_grad():
        for k, t in own.items():
            if k in sd:
                t.copy_(sd[k].to(t.dtype))


# ------------------------------------------------------------------------------------------- forward inputs
def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, T, T]`` bool, True where query t may attend key s: s <= t and both in the same document."""
    T = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def attention_mask_for(segment_ids: torch.Tensor, model: nn.Module, doc_masking: bool,
                       device: torch.device | str | None = None) -> torch.Tensor | None:
    """The ``attention_mask`` a forward of packed windows needs (``None`` = pass none).

    - ``doc_masking`` with sdpa/eager: a 4D block-diagonal causal mask from the loader's ``segment_ids``
      (bool for sdpa, additive for eager; transformers passes a 4D mask through unchanged). Windows that
      hold one document get None: the plain causal kernel.
    - ``doc_masking`` with flash_attention_2: None; transformers then finds the documents from the
      ``position_ids`` that restart at 0 (varlen attention).
    - without ``doc_masking``: an all-ones ``[b, T]`` mask, which switches off transformers' own detection of
      packed sequences from ``position_ids``, so the window attends causally across documents."""
    b, T = segment_ids.shape
    if not doc_masking:
        return torch.ones(b, T, dtype=torch.long, device=device)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager") or not bool((segment_ids != segment_ids[:, :1]).any()):
        return None
    mask = document_mask(segment_ids.to(device, non_blocking=True))
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def model_inputs(batch: Any, model: nn.Module, doc_masking: bool, device: torch.device | str) -> dict:
    """The forward's keyword arguments for a loader batch on ``device``: ``input_ids``, ``position_ids`` and
    the ``attention_mask`` of :func:`attention_mask_for` when there is one."""
    # the loader's host tensors go to the device without blocking the host (a blocking copy waits for the
    # device's queue: a host sync per micro-step)
    kw = {"input_ids": batch.input_ids.to(device, non_blocking=True),
          "position_ids": batch.position_ids.to(device, non_blocking=True)}
    mask = attention_mask_for(batch.segment_ids, model, doc_masking, device)
    if mask is not None:
        kw["attention_mask"] = mask
    return kw


# ------------------------------------------------------------------------------------------- counting
def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total`` and ``non_embedding`` parameters (embedding = every ``nn.Embedding``: tokens, and positions where
    the model has a table; an untied LM head counts as non-embedding). Shared (tied) tensors count once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb_ids: set[int] = set()
    emb = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) not in emb_ids:
            emb_ids.add(id(m.weight))
            emb += m.weight.numel()
    return {"total": total, "non_embedding": total - emb}


def count_config_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """:func:`count_parameters` of the model ``cfg`` describes, built on the meta device (nothing allocated,
    ``init_from`` not read), plus its class name."""
    hf = resolve_hf_config(cfg)
    model = _instantiate(hf, "eager" if cfg.attn_implementation == "flash_attention_2" else cfg.attn_implementation,
                         0, device="meta")
    return {**count_parameters(model), "class": type(model).__name__}


__all__ = ["resolve_hf_config", "check_attn_implementation", "build_model", "read_state_dict", "load_weights",
           "document_mask", "attention_mask_for", "model_inputs", "count_parameters", "count_config_parameters"]

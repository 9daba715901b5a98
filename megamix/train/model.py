"""The model: a GPT-2 style decoder from transformers, randomly initialised."""
from __future__ import annotations

import torch
from torch import nn

from megamix.config import ModelConfig


def build_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (seeded, so every rank builds the same weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=50256, eos_token_id=50256)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(gcfg)
    finally:
        torch.random.set_rng_state(state)
    return model


def window_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document-relative positions -> positions that restart at 0 at the window start and at every
    document start inside the window (so they stay < seq_len for the position embedding)."""
    starts = position_ids == 0
    starts[:, 0] = True
    seg = torch.cumsum(starts.long(), dim=1)
    first = seg == 1
    return torch.where(first, position_ids - position_ids[:, :1], position_ids)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Final hidden states a [B, T, d] (after the final layer norm), i.e. the LM head's input.

    ``position_ids`` are the loader's document-relative positions; they are converted with
    :func:`window_positions`. Attention is not masked across documents packed into one window.
    """
    if position_ids is not None:
        position_ids = window_positions(position_ids)
    out = model.transformer(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head matrix W [V, d] (the tied embedding when embeddings are tied)."""
    return model.lm_head.weight


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "non_embedding": total - emb}

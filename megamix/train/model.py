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


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "non_embedding": total - emb}

"""Integrations of megamix into existing training stacks.

- :mod:`megamix.integrations.capture`: generic projected per-sample LM-head gradient capture (hooks).
- :mod:`megamix.integrations.deepspeed`: DeepSpeed engines, ``attach(engine_or_model, mixer)``,
  checkpoints, launch validation and the multi-rank training loop (the only module importing deepspeed).
- :mod:`megamix.integrations.tensor_parallel`: vocab-parallel (Megatron TP) LM heads.
- :mod:`megamix.integrations.apex_compat`: optional NVIDIA apex with torch fallbacks.
"""
from megamix.integrations.capture import LMHeadGradCapture, find_lm_head


def attach(engine_or_model, mixer, **kwargs):
    """Hook a :class:`megamix.mixer.Mixer` to a plain model or a DeepSpeed engine (see
    :func:`megamix.integrations.deepspeed.attach`; deepspeed itself is not imported)."""
    from megamix.integrations.deepspeed import attach as _attach
    return _attach(engine_or_model, mixer, **kwargs)


__all__ = ["LMHeadGradCapture", "find_lm_head", "attach"]

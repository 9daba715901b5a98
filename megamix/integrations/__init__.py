"""How megamix plugs into existing training stacks. Each module needs only a :class:`megamix.mixer.Mixer`.

- :mod:`megamix.integrations.hf`: the one-line fused-LM-head patch for Hugging Face causal LMs
  (``apply_megamix(model, mixer)``): megamix owns the loss, no ``[B, T, V]`` logits, Triton on GPU.
- :mod:`megamix.integrations.hook`: the capture path (``attach(model, mixer)``): hooks on any LM head
  read δ from your own loss's backward (HF, Megatron ``[s, b, h]``, DeepSpeed engines, any loss).
- :mod:`megamix.integrations.deepspeed`: DeepSpeed glue (ds_config, launch checks, init, engine, ZeRO-3
  parameters, engine checkpoint files); the only module that imports deepspeed.
- :mod:`megamix.integrations.megatron`: Megatron-core wiring, any tensor-parallel size: the capture on
  ``output_layer`` (``attach_megatron``) and the vocab-parallel fused loss (``vocab_parallel_lm_head_loss``).
- :mod:`megamix.integrations.apex_compat`: optional NVIDIA apex (its FusedAdam, only the real apex on CUDA).
- :mod:`megamix.integrations.hf_trainer`: ``transformers.Trainer`` and Accelerate (``MegamixTrainer``,
  ``MegamixCallback``, ``MegamixFeed``, per-rank state files in the Trainer's checkpoints); import it
  directly (it loads the Trainer, so this package does not).

The training loop (:mod:`megamix.train`) is built on these; they never import it.
"""
from megamix.integrations.hf import apply_megamix
from megamix.integrations.hook import LMHeadGradCapture, MixerHook, attach, find_lm_head

__all__ = ["apply_megamix", "attach", "find_lm_head", "LMHeadGradCapture", "MixerHook"]

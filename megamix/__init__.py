"""megamix: online data mixing for LLM pretraining, driven by projected per-sample LM-head gradients."""
__version__ = "0.1.0"

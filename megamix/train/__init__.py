"""Training loops: the single-process trainer (CPU demo) and shared pieces used by the DeepSpeed path."""

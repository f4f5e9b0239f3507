"""Per-process execution: KV cache storage and the model runner."""

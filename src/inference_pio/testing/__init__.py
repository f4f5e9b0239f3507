"""Helpers for tests and demos: random-weight checkpoints with the real layout and names."""

from __future__ import annotations

from inference_pio.testing.checkpoint import (
    MIN_VOCAB_FOR_TOKENIZER,
    PRESETS,
    checkpoint_shapes,
    default_generation_config,
    make_test_model,
    plan_shards,
    qwen3_coder_30b_config,
    random_model,
    random_tensor,
    shard_file_names,
    tensor_seed,
    tiny_dense_config,
    tiny_moe_config,
    write_random_checkpoint,
)

__all__ = [
    "MIN_VOCAB_FOR_TOKENIZER",
    "PRESETS",
    "checkpoint_shapes",
    "default_generation_config",
    "make_test_model",
    "plan_shards",
    "qwen3_coder_30b_config",
    "random_model",
    "random_tensor",
    "shard_file_names",
    "tensor_seed",
    "tiny_dense_config",
    "tiny_moe_config",
    "write_random_checkpoint",
]

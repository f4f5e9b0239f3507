"""The embedded default: a small random-weight Qwen3-MoE checkpoint of the real format, written
on first use into the cache folder, so that everything runs before real weights are present."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from inference_pio import envs
from inference_pio.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "inference-pio/qwen3-moe-tiny-random"
_VERSION = "v1"  # bump when the config or writer changes, so stale copies are not reused
REAL_MODEL_ID = "Qwen/Qwen3-Coder-30B-A3B-Instruct"


def default_model_config() -> ModelConfig:
    """Real vocabulary and tokenizer, Qwen3-MoE layout, tiny sizes."""
    from inference_pio.testing import tiny_moe_config

    return tiny_moe_config(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, num_experts=16,
                           num_experts_per_tok=4, moe_intermediate_size=64)


def default_model_dir() -> Path:
    """Path of the embedded default model, writing it first if it is not there yet."""
    target = envs.cache_dir() / "models" / f"qwen3-moe-tiny-random-{_VERSION}"
    if (target / "config.json").exists():
        return target
    from inference_pio.testing import write_random_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    try:
        write_random_checkpoint(tmp, default_model_config(), seed=0, dtype="bfloat16")
        try:
            os.rename(tmp, target)  # atomic: a concurrent writer that lost the race cleans up
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def random_weights_warning(path: Path) -> str:
    return (
        f"No model given: using the embedded default {DEFAULT_MODEL_NAME} at {path}. Its weights "
        "are RANDOM, so its output is gibberish. For real output, pass --model (or "
        f"model_path=) a directory holding {REAL_MODEL_ID} (config.json, *.safetensors, "
        f"tokenizer files), e.g. after `huggingface-cli download {REAL_MODEL_ID} --local-dir "
        "DIR`, or set INFERENCE_PIO_MODEL=DIR."
    )

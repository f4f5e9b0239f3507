"""Shared fixtures. Checkpoints are written once per session into a tmp dir: treat them as
read-only (copy one with `shutil.copytree` before changing it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from inference_pio.config import ModelConfig
from inference_pio.testing import tiny_dense_config, tiny_moe_config, write_random_checkpoint

# NOTE: the tokenizer module lands in parallel with these fixtures; until it exists the tiny
# checkpoints are written without tokenizer files. Drop this check once it is in.
HAS_TOKENIZER = importlib.util.find_spec("inference_pio.tokenizer") is not None


@pytest.fixture(scope="session")
def tiny_moe_cfg() -> ModelConfig:
    """2 layers, hidden 64, 8 experts top-2, real vocab (151936), untied."""
    return tiny_moe_config()


@pytest.fixture(scope="session")
def tiny_dense_cfg() -> ModelConfig:
    """Dense Qwen3, 2 layers, hidden 64, real vocab, tied embeddings."""
    return tiny_dense_config()


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_moe_cfg: ModelConfig) -> Path:
    """tiny_moe_cfg written with seed 0 in bfloat16, as 3 shards plus an index (read-only)."""
    out = tmp_path_factory.mktemp("tiny_moe")
    return write_random_checkpoint(out, tiny_moe_cfg, seed=0, num_shards=3,
                                   tokenizer=HAS_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dense_cfg: ModelConfig) -> Path:
    """tiny_dense_cfg written with seed 0 in bfloat16 as one model.safetensors, without
    lm_head.weight since it is tied (read-only)."""
    out = tmp_path_factory.mktemp("tiny_dense")
    return write_random_checkpoint(out, tiny_dense_cfg, seed=0, tokenizer=HAS_TOKENIZER)

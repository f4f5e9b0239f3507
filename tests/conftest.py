"""Shared fixtures. Checkpoints are written once per session into a tmp dir: treat them as
read-only (copy one with `shutil.copytree` before changing it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from inference_pio.config import ModelConfig
from inference_pio.testing import tiny_dense_config, tiny_moe_config, write_random_checkpoint

_OWN_CACHE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    # Tests never read or write the user's cache (converted tokenizer, embedded default model).
    if "INFERENCE_PIO_CACHE" not in os.environ:
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="pio-test-cache-"))
        os.environ["INFERENCE_PIO_CACHE"] = _OWN_CACHE[0]
    os.environ.pop("INFERENCE_PIO_MODEL", None)
    # Triton kernels run on CPU tensors through Triton's interpreter where there is no GPU
    # (read when triton is imported, so set before any test imports it)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)


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
    return write_random_checkpoint(out, tiny_moe_cfg, seed=0, num_shards=3)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dense_cfg: ModelConfig) -> Path:
    """tiny_dense_cfg written with seed 0 in bfloat16 as one model.safetensors, without
    lm_head.weight since it is tied (read-only)."""
    out = tmp_path_factory.mktemp("tiny_dense")
    return write_random_checkpoint(out, tiny_dense_cfg, seed=0)

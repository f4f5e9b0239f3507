"""Inference-PIO: an inference engine for code models (first plugin: Qwen3-Coder-30B-A3B)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so `import inference_pio` (and `pio --help`) does not import torch.
    if name == "LLM":
        from inference_pio.llm import LLM

        return LLM
    if name == "SamplingParams":
        from inference_pio.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'inference_pio' has no attribute {name!r}")

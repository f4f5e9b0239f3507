"""Helpers for comparing against the reference implementation (transformers), used by tests
and benchmarks. transformers is a test dependency: it is imported only when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """transformers' model for a checkpoint directory, in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def hf_greedy(model: Any, prompt_ids: list[int], num_new_tokens: int) -> list[int]:
    """transformers' greedy continuation: exactly `num_new_tokens` tokens, no eos stop, no
    repetition penalty (the checkpoint's generation_config would add one)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, do_sample=False, max_new_tokens=num_new_tokens,
                         min_new_tokens=num_new_tokens, repetition_penalty=1.0,
                         attention_mask=torch.ones_like(ids))
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def prompt_logits(model: torch.nn.Module, config: Any, token_ids: list[int] | torch.Tensor,
                  chunk: int = 256) -> torch.Tensor:
    """Our model's next-token logits [T, V] (float32) at every position of one sequence,
    teacher-forced through a contiguous KV cache in chunks of `chunk` tokens."""
    from inference_pio.forward_context import ForwardContext, forward_context
    from inference_pio.runtime.kv_cache import ContiguousKVCache

    ids = torch.as_tensor(token_ids, dtype=torch.long)
    dtype = model.model.norm.weight.dtype  # the activation dtype (embeddings may be bf16)
    cache = ContiguousKVCache(config, dtype)
    cache.allocate(0, ids.numel())
    cache.bind((0,))
    out = []
    for start in range(0, ids.numel(), chunk):
        piece = ids[start:start + chunk]
        with forward_context(ForwardContext((piece.numel(),), (start,), cache)):
            hidden = model(piece, torch.arange(start, start + piece.numel()))
        out.append(model.compute_logits(hidden).float())
    return torch.cat(out)

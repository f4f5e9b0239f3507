"""The one channel through which the runner tells attention layers where the batch's KV lives.

The model's signature stays `forward(input_ids, positions)`; everything about sequences, caches
and slots rides in a `ForwardContext` set with `with forward_context(ctx):` (no nesting)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from inference_pio.layers.attention import AttentionBackend


class KVCacheStore(Protocol):
    """What attention needs of a KV cache: write new K/V, read a sequence's K/V."""

    def write(self, layer_idx: int, seq_idx: int, start: int,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, Hkv, Hd] of batch sequence `seq_idx` at positions start..start+n."""

    def read(self, layer_idx: int, seq_idx: int, end: int,
             start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [end - start, Hkv, Hd] of batch sequence `seq_idx`, positions start..end, in
        the compute dtype. A sliding window passes `start` so that only the positions it can
        see are gathered (and freed blocks before them are never touched)."""


@dataclass(frozen=True)
class ForwardContext:
    """Layout of a flat token batch: sequence i owns `num_new_tokens[i]` consecutive tokens of
    input_ids, which follow `num_cached_tokens[i]` tokens already in `kv_cache`.

    `attention_backend` is the kernel every Attention layer of the pass uses (None = "auto":
    SDPA for prefill chunks, the fp32 matmul backend for single-token decode); build it once
    with `layers.attention.get_attention_backend(name)`."""

    num_new_tokens: tuple[int, ...]
    num_cached_tokens: tuple[int, ...]
    kv_cache: KVCacheStore | None = None
    sliding_window: int | None = None
    attention_backend: AttentionBackend | None = None

    def __post_init__(self) -> None:
        if len(self.num_new_tokens) != len(self.num_cached_tokens):
            raise ValueError(
                "num_new_tokens and num_cached_tokens must have one entry per sequence")
        if self.kv_cache is None and any(self.num_cached_tokens):
            raise ValueError("cached tokens need a kv_cache")


_CURRENT: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("forward_context does not nest: a forward pass is already running")
    _CURRENT = ctx
    try:
        yield ctx
    finally:
        _CURRENT = None


def get_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("no forward context: run the model inside `with forward_context(ctx):`")
    return _CURRENT

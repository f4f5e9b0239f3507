"""Runs one scheduled step on this process's model: flat inputs, forward, logits, sampling."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from inference_pio.config import ModelConfig
from inference_pio.forward_context import ForwardContext, KVCacheStore, forward_context
from inference_pio.layers.attention import get_attention_backend
from inference_pio.layers.sampler import Sampler, make_generator
from inference_pio.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step: compute `new_token_ids` after `num_cached_tokens`, with
    its KV in `block_ids` (the request's whole block table)."""

    request_id: str
    new_token_ids: list[int]
    num_cached_tokens: int
    block_ids: list[int]
    needs_sample: bool  # False for a prompt chunk that does not reach the prompt's end
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    suppress_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None


class PagedKVStore(KVCacheStore, Protocol):
    """What the runner needs of a KV cache beyond the attention protocol."""

    def bind(self, block_tables: list[list[int]]) -> KVCacheStore: ...


class ModelRunner:
    """Owns the model, its KV cache, the attention backend and each request's RNG."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_valid_tokens: int,
                 kv_cache: PagedKVStore, device: str | torch.device = "cpu",
                 attention_backend: str = "auto", sliding_window: int | None = None) -> None:
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.kv_cache = kv_cache
        self.attention_backend = get_attention_backend(attention_backend, kv_cache)
        self.sliding_window = sliding_window
        self.sampler = Sampler(num_valid_tokens=num_valid_tokens)
        self._generators: dict[str, torch.Generator | None] = {}

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget finished requests' RNGs (a preempted request keeps its RNG)."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> dict[str, SampledToken]:
        """Forward the batch as one flat sequence of tokens; sample where asked."""
        input_ids, positions = self._prepare_inputs(batch)
        ctx = ForwardContext(
            num_new_tokens=tuple(len(s.new_token_ids) for s in batch),
            num_cached_tokens=tuple(s.num_cached_tokens for s in batch),
            kv_cache=self.kv_cache.bind([s.block_ids for s in batch]),
            sliding_window=self.sliding_window,
            attention_backend=self.attention_backend,
            device=self.device,
        )
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)  # [T, H]
        sampled = [s for s in batch if s.needs_sample]
        if not sampled:
            return {}
        ends, end = [], 0
        for s in batch:  # the last new token of each sequence that samples (host-side indices)
            end += len(s.new_token_ids)
            if s.needs_sample:
                ends.append(end - 1)
        logits = self.model.compute_logits(hidden[torch.tensor(ends, device=self.device)])
        out = self.sampler(
            logits,
            [s.params for s in sampled],
            [s.prompt_token_ids for s in sampled],
            [s.output_token_ids for s in sampled],
            [self._generator(s) for s in sampled],
            [s.suppress_token_ids for s in sampled],
        )
        return {s.request_id: SampledToken(tok, lp)
                for s, tok, lp in zip(sampled, out.token_ids, out.logprobs)}

    def _generator(self, seq: ScheduledSequence) -> torch.Generator | None:
        if seq.request_id not in self._generators:
            self._generators[seq.request_id] = make_generator(seq.params.seed, self.device)
        return self._generators[seq.request_id]

    def _prepare_inputs(self, batch: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        for s in batch:
            ids.extend(s.new_token_ids)
            pos.extend(range(s.num_cached_tokens, s.num_cached_tokens + len(s.new_token_ids)))
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(pos, dtype=torch.long, device=self.device))

"""Runs one scheduled step on this process's model: flat inputs, forward, logits, sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_pio.config import ModelConfig
from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.layers.sampler import Sampler, make_generator
from inference_pio.runtime.kv_cache import ContiguousKVCache
from inference_pio.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step: compute `new_token_ids` after `num_cached_tokens`."""

    request_id: str
    new_token_ids: list[int]
    num_cached_tokens: int
    needs_sample: bool  # False for a prompt chunk that does not reach the prompt's end
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    suppress_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None


class ModelRunner:
    """Owns the model, its KV cache and each request's RNG; `execute` runs one step."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_valid_tokens: int,
                 device: str | torch.device = "cpu") -> None:
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.kv_cache = ContiguousKVCache(config, self.dtype, self.device)
        self.sampler = Sampler(num_valid_tokens=num_valid_tokens)
        self._slots: dict[str, int] = {}
        self._generators: dict[str, torch.Generator | None] = {}

    def add_request(self, request_id: str, capacity: int, seed: int | None) -> None:
        """Reserve KV for `capacity` tokens (it grows if needed) and seed the request's RNG."""
        slot = next(i for i in range(len(self._slots) + 1) if i not in self._slots.values())
        self.kv_cache.allocate(slot, capacity)
        self._slots[request_id] = slot
        self._generators[request_id] = make_generator(seed, self.device)

    def free_request(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self.kv_cache.free(slot)
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> dict[str, SampledToken]:
        """Forward the batch as one flat sequence of tokens; sample where asked."""
        input_ids, positions = self._prepare_inputs(batch)
        ctx = ForwardContext(
            num_new_tokens=tuple(len(s.new_token_ids) for s in batch),
            num_cached_tokens=tuple(s.num_cached_tokens for s in batch),
            kv_cache=self.kv_cache.bind(tuple(self._slots[s.request_id] for s in batch)),
        )
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)  # [T, H]
        sampled = [s for s in batch if s.needs_sample]
        if not sampled:
            return {}
        ends = torch.tensor(ctx.num_new_tokens, device=self.device).cumsum(0) - 1
        rows = torch.tensor([s.needs_sample for s in batch], device=self.device)
        logits = self.model.compute_logits(hidden[ends[rows]])  # [B, V]
        out = self.sampler(
            logits,
            [s.params for s in sampled],
            [s.prompt_token_ids for s in sampled],
            [s.output_token_ids for s in sampled],
            [self._generators[s.request_id] for s in sampled],
            [s.suppress_token_ids for s in sampled],
        )
        return {s.request_id: SampledToken(tok, lp)
                for s, tok, lp in zip(sampled, out.token_ids, out.logprobs)}

    def _prepare_inputs(self, batch: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        for s in batch:
            ids.extend(s.new_token_ids)
            pos.extend(range(s.num_cached_tokens, s.num_cached_tokens + len(s.new_token_ids)))
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(pos, dtype=torch.long, device=self.device))

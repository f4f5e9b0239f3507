"""A request is its tokens and two counters: how many tokens it has and how many are computed.

Pure Python (no torch, no tokenizer import at run time): the scheduler and block manager test it
on CPU alone."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inference_pio.engine.stop import StopChecker
from inference_pio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inference_pio.tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; its KV was freed and is recomputed
    FINISHED = "finished"


# NOTE: eq=False, so `req in some_list` is identity, not a field-by-field compare of token lists.
@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_checker: StopChecker
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # the client-safe message of a request the engine failed
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_streamed_chars: int = 0  # how much of output_text earlier outputs already carried
    num_streamed_tokens: int = 0
    # Paged KV bookkeeping, owned by the scheduler / block manager.
    block_ids: list[int] = field(default_factory=list)  # NULL_BLOCK_ID for freed window blocks
    block_hashes: list[bytes] = field(default_factory=list)  # one per full block of all tokens
    num_cached_tokens: int = 0  # prefix-cache hit (tokens) at first admission
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def get_token_ids(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without copying the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus the most tokens this request may generate (its KV capacity)."""
        assert self.stop_checker.max_output_tokens is not None
        return len(self.prompt_token_ids) + self.stop_checker.max_output_tokens

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = time.monotonic()

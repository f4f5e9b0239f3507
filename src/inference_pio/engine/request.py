"""A request is its tokens and two counters: how many tokens it has and how many are computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from inference_pio.engine.stop import StopChecker
from inference_pio.sampling_params import SamplingParams
from inference_pio.tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
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
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_streamed_chars: int = 0  # how much of output_text earlier outputs already carried
    num_streamed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

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

"""The dataclasses that cross the engine boundary (vLLM-shaped for users)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence. `logprobs`, when asked for, holds one dict per generated token
    mapping token id -> logprob: the sampled token plus the top-k of the raw distribution."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # text added since the previous output of this request (for streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


class RequestFailedError(RuntimeError):
    """An engine step failed for one request only (`request_id`); the message is safe to show
    a client. The step's other requests are unaffected."""

    def __init__(self, request_id: str, message: str = "the request failed in the engine"
                 ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.message = message

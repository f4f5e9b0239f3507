"""When a request finishes, and how its output text is cut (pure Python, no torch).

Contract with the engine: after appending each new token, detokenize it into the request's
output text, then call `StopChecker.check` with the number of characters that token added.
Because every token is checked, a stop string can only newly appear in the last
`num_new_chars + len(stop) - 1` characters, which is all that is searched (as in vLLM)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from inference_pio.sampling_params import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class StopDecision:
    """A finished request: why, what ended it, and the output text to report."""

    finish_reason: FinishReason
    stop_reason: str | int | None  # the stop string or stop token id; None for eos and length
    text: str


class StopChecker:
    """Finish detection for one request.

    `max_output_tokens` is the engine's own cap (e.g. context length minus prompt length); it
    combines with `params.max_tokens`, the smaller winning. Both end with finish_reason "length".
    Stop conditions are checked before length, so a stop on the last allowed token is a "stop".
    """

    def __init__(self, params: SamplingParams, eos_token_ids: Collection[int],
                 max_output_tokens: int | None = None) -> None:
        self.params = params
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        limits = [n for n in (params.max_tokens, max_output_tokens) if n is not None]
        self.max_output_tokens = min(limits) if limits else None

    def check(self, output_text: str, num_new_chars: int, last_token_id: int,
              num_output_tokens: int) -> StopDecision | None:
        """None while the request should go on; else the decision.

        Args:
            output_text: the whole detokenized output so far, including the newest token.
            num_new_chars: how many trailing characters of `output_text` the newest token added.
            num_output_tokens: generated tokens so far, including the newest one.
        """
        if num_output_tokens >= self.params.min_tokens:
            stopped = self._check_stop(output_text, num_new_chars, last_token_id)
            if stopped is not None:
                return stopped
        if self.max_output_tokens is not None and num_output_tokens >= self.max_output_tokens:
            return StopDecision("length", None, output_text)
        return None

    def _check_stop(self, output_text: str, num_new_chars: int,
                    last_token_id: int) -> StopDecision | None:
        if last_token_id in self.eos_token_ids or last_token_id in self.stop_token_ids:
            # As vLLM: the text of a stop token is not output unless asked for. (Eos tokens are
            # special, so with skip_special_tokens their text is empty anyway.)
            keep = self.params.include_stop_str_in_output or num_new_chars == 0
            text = output_text if keep else output_text[:-num_new_chars]
            is_eos = last_token_id in self.eos_token_ids
            return StopDecision("stop", None if is_eos else last_token_id, text)
        found = find_stop_string(output_text, num_new_chars, self.params.stop or (),
                                 self.params.include_stop_str_in_output)
        if found is None:
            return None
        stop_str, end = found
        return StopDecision("stop", stop_str, output_text[:end])

    def suppress_token_ids(self, num_output_tokens: int) -> frozenset[int]:
        """Token ids the sampler must not pick next, so that `min_tokens` is honoured.

        `num_output_tokens` counts tokens generated so far (before the one being sampled)."""
        if num_output_tokens >= self.params.min_tokens:
            return frozenset()
        return self.eos_token_ids | self.stop_token_ids

    def num_hold_back_chars(self, output_text: str) -> int:
        """Trailing characters a stream must not send yet: they may become a cut stop string.

        Only for an unfinished request; once finished, send the decision's text in full."""
        if self.params.include_stop_str_in_output:
            # Nothing before a stop string's end is ever cut; what follows it is only the
            # newest token's text, which is checked before anything is streamed.
            return 0
        return num_hold_back_chars(output_text, self.params.stop or ())


def find_stop_string(output_text: str, num_new_chars: int, stop: Sequence[str],
                     include_stop_str_in_output: bool) -> tuple[str, int] | None:
    """The first stop string to complete in the new text, and the length to cut the text to.

    Only matches that end inside the last `num_new_chars` characters are new; earlier ones
    were seen (and did not exist) when their own tokens were checked. "First to complete" is
    what a character-by-character stream would see; ties go to the longer string."""
    if num_new_chars <= 0:
        return None
    best: tuple[int, int, str] | None = None  # (end, start, stop string)
    for stop_str in stop:
        start = max(0, len(output_text) - num_new_chars - len(stop_str) + 1)
        index = output_text.find(stop_str, start)
        if index != -1:
            candidate = (index + len(stop_str), index, stop_str)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    if best is None:
        return None
    end, index, stop_str = best
    return stop_str, (end if include_stop_str_in_output else index)


def num_hold_back_chars(output_text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `output_text` that is a proper prefix of a stop string.

    Streaming everything but this suffix never sends a character that a later stop string
    match would cut: such a match starts inside a suffix like this one."""
    longest = 0
    for stop_str in stop:
        for size in range(min(len(stop_str) - 1, len(output_text)), longest, -1):
            if output_text.endswith(stop_str[:size]):
                longest = size
                break
    return longest

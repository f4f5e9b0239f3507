"""LLMEngine: add requests, then `step()` (schedule -> execute -> update) until all finish."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from inference_pio.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from inference_pio.engine.request import Request, RequestStatus
from inference_pio.engine.stop import StopChecker
from inference_pio.sampling_params import SamplingParams
from inference_pio.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from inference_pio.runtime.model_runner import ModelRunner, SampledToken, ScheduledSequence


class RequestError(ValueError):
    """A request the engine cannot serve; the message names the field and the fix."""


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, eos_token_ids: Collection[int],
                 max_model_len: int, max_num_seqs: int = 16) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_limit = runner.config.vocab_size
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (
            None, list(prompt))
        self._check_prompt(ids)
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"the prompt has {len(ids)} tokens and max_tokens={params.max_tokens}: together "
                f"they exceed max_model_len={self.max_model_len}; lower max_tokens to {room} "
                "or less, shorten the prompt, or raise max_model_len")
        req = Request(
            request_id=request_id, prompt=text, prompt_token_ids=ids, params=params,
            stop_checker=StopChecker(params, self.eos_token_ids, max_output_tokens=room),
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )
        self.requests[request_id] = req
        self.waiting.append(req)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_limit]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.vocab_limit})")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_model_len is "
                               f"{self.max_model_len}, leaving no room to generate: shorten it")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        req.finish("abort")
        self._release(req)
        return self._make_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self._schedule()
        if not batch:
            return []
        sampled = self.runner.execute(batch)
        return self._update(batch, sampled)

    def _schedule(self) -> list[ScheduledSequence]:
        """Admit waiting requests while slots remain; every running request computes all of its
        uncomputed tokens (the whole prompt, then one token per step)."""
        from inference_pio.runtime.model_runner import ScheduledSequence

        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.pop(0)
            self.runner.add_request(req.request_id, self._initial_kv_capacity(req), req.params.seed)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return [
            ScheduledSequence(
                request_id=req.request_id,
                new_token_ids=req.all_token_ids[req.num_computed_tokens:],
                num_cached_tokens=req.num_computed_tokens,
                needs_sample=True,
                params=req.params,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                suppress_token_ids=req.stop_checker.suppress_token_ids(len(req.output_token_ids)),
            )
            for req in self.running
        ]

    @staticmethod
    def _initial_kv_capacity(req: Request) -> int:
        # The cache grows on demand, so an uncapped request does not reserve max_model_len.
        return min(req.max_num_tokens, len(req.prompt_token_ids) + 256)

    def _update(self, batch: list[ScheduledSequence], sampled: dict[str, SampledToken]
                ) -> list[RequestOutput]:
        outputs = []
        for sched in batch:
            req = self.requests[sched.request_id]
            req.num_computed_tokens += len(sched.new_token_ids)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            self._append_token(req, token)
            if req.is_finished:
                self._release(req)
            outputs.append(self._make_output(req))
        return outputs

    def _append_token(self, req: Request, token: SampledToken) -> None:
        now = time.monotonic()
        req.first_token_time = req.first_token_time or now
        req.output_token_ids.append(token.token_id)
        if req.logprobs is not None and token.logprobs is not None:
            req.logprobs.append(token.logprobs)
            req.cumulative_logprob = (req.cumulative_logprob or 0.0) + token.logprobs[token.token_id]
        delta = req.detokenizer.add(token.token_id)
        decision = req.stop_checker.check(req.detokenizer.text, len(delta), token.token_id,
                                          len(req.output_token_ids))
        if decision is None:
            req.output_text = req.detokenizer.text
            return
        req.detokenizer.finish()
        req.output_text = decision.text
        if decision.finish_reason == "length":
            req.output_text = req.detokenizer.text
        req.finish(decision.finish_reason, decision.stop_reason)

    def _release(self, req: Request) -> None:
        self.runner.free_request(req.request_id)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        del self.requests[req.request_id]

    def _make_output(self, req: Request) -> RequestOutput:
        """Snapshot of a request; `delta_*` hold what earlier snapshots did not carry. Text a
        stop string may still cut is held back until it cannot be."""
        hold = 0 if req.is_finished else req.stop_checker.num_hold_back_chars(req.output_text)
        visible = req.output_text[: len(req.output_text) - hold]
        delta_text = visible[req.num_streamed_chars:]
        delta_ids = req.output_token_ids[req.num_streamed_tokens:]
        req.num_streamed_chars = max(req.num_streamed_chars, len(visible))
        req.num_streamed_tokens = len(req.output_token_ids)
        completion = CompletionOutput(
            index=0, text=visible, token_ids=list(req.output_token_ids),
            finish_reason=req.finish_reason, stop_reason=req.stop_reason,
            logprobs=None if req.logprobs is None else list(req.logprobs),
            cumulative_logprob=req.cumulative_logprob,
        )
        metrics = RequestMetrics(
            arrival_time=req.arrival_time, first_token_time=req.first_token_time,
            finished_time=req.finished_time, num_prompt_tokens=len(req.prompt_token_ids),
            num_generated_tokens=len(req.output_token_ids),
        )
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), [completion],
                             req.is_finished, metrics, delta_text, delta_ids)

"""LLMEngine: add requests, then `step()` (schedule -> execute -> update) until all finish.

Tokenization, detokenization and stop decisions live here; batching and KV blocks live in the
scheduler; tensors live in the runner.

One request never fails another: every per-request value is checked in `add_request`, and if a
step still raises (a bug, an input no check caught), the scheduled requests are re-run in halves
until the failing one(s) are found; those finish with finish_reason "error" and their KV blocks
are freed, the others go on. The engine is thread-safe: one lock guards every public call."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING

from inference_pio.engine.outputs import (
    CompletionOutput,
    RequestFailedError,
    RequestMetrics,
    RequestOutput,
)
from inference_pio.engine.request import Request
from inference_pio.engine.scheduler import (
    KVCacheTooSmallError,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from inference_pio.engine.stop import StopChecker
from inference_pio.sampling_params import SamplingParams
from inference_pio.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from inference_pio.runtime.model_runner import ModelRunner, SampledToken, ScheduledSequence

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "RequestError", "RequestFailedError"]


class RequestError(ValueError):
    """A request the engine cannot serve; the message names the field and the fix."""


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, eos_token_ids: Collection[int],
                 scheduler_config: SchedulerConfig) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.scheduler = Scheduler(scheduler_config)
        self.max_model_len = scheduler_config.max_model_len
        self.vocab_limit = runner.config.vocab_size
        self.num_steps = 0
        self._lock = threading.RLock()
        self._pending: list[RequestOutput] = []  # aborted since the last step, for step() to return
        # aborts from other threads while a step runs, handed to the step (see abort_request)
        self._aborts: deque[_AbortHandoff] = deque()

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request. Every value is checked here, before anything slow: `prompt` is text
        or a list of token ids, ids (prompt and `params.stop_token_ids`) lie in the model's
        vocabulary [0, vocab_size), and prompt plus max_tokens fit max_model_len; otherwise
        RequestError (a ValueError) names the field and the fix."""
        if not isinstance(request_id, str):
            raise RequestError(f"request id must be a str, got {type(request_id).__name__}")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got "
                               f"{type(params).__name__}")
        with self._lock:
            if request_id in self.scheduler.requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            text, ids = self._prompt_ids(prompt)
            self._check_prompt(ids, params)
            req = Request(
                request_id=request_id, prompt=text, prompt_token_ids=ids, params=params,
                stop_checker=StopChecker(params, self.eos_token_ids,
                                         max_output_tokens=self.max_model_len - len(ids)),
                detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            try:
                self.scheduler.add_request(req)
            except KVCacheTooSmallError as e:
                raise RequestError(str(e)) from None

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, bytes | bytearray | memoryview):
            raise RequestError("the prompt is bytes: decode it to str (text), or pass a list of "
                               "token ids")
        if not isinstance(prompt, list | tuple):
            raise RequestError(f"the prompt is a {type(prompt).__name__}: give text (str) or a "
                               "list of token ids")
        ids = list(prompt)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool):
                raise RequestError(f"prompt token ids must be ints, got {i!r} "
                                   f"({type(i).__name__})")
        return None, ids

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_limit]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.vocab_limit})")
        bad = [i for i in params.stop_token_ids or () if not i < self.vocab_limit]
        if bad:
            raise RequestError(f"stop_token_ids holds {bad[0]}, outside the vocabulary "
                               f"[0, {self.vocab_limit}): remove it")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_model_len is "
                               f"{self.max_model_len}, leaving no room to generate: shorten it")
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"the prompt has {len(ids)} tokens and max_tokens={params.max_tokens}: together "
                f"they exceed max_model_len={self.max_model_len}; lower max_tokens to {room} "
                "or less, shorten the prompt, or raise max_model_len")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request with reason "abort" and free its KV blocks at once; safe from any
        thread. Returns its final output (None if unknown or already finished), which the next
        `step()` also returns (even with nothing left to run), so a loop driving `step()` sees
        every request end. While a step runs in another thread, the abort is handed to that
        step, which carries it out before it returns: a loop that starts the next step at once
        would otherwise win the engine's lock again and again (a lock is not fair), and the
        abort could wait until the request had finished on its own."""
        if self._lock.acquire(blocking=False):  # no step running (or this thread's own)
            try:
                return self._abort_now(request_id)
            finally:
                self._lock.release()
        handoff = _AbortHandoff(request_id)
        self._aborts.append(handoff)
        while not handoff.done.wait(0.005):
            if self._lock.acquire(blocking=False):  # the step ended without taking it
                try:
                    self._take_aborts()
                finally:
                    self._lock.release()
        return handoff.result

    def _take_aborts(self) -> None:
        """Carry out the aborts handed over by other threads (the lock is held)."""
        while self._aborts:
            handoff = self._aborts.popleft()
            handoff.result = self._abort_now(handoff.request_id)
            handoff.done.set()

    def _abort_now(self, request_id: str) -> RequestOutput | None:
        """abort_request's work (the lock is held)."""
        req = self.scheduler.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        req.finish("abort")
        self.scheduler.finish_request(request_id, "abort")
        out = self._make_output(req)
        self._pending.append(out)
        return out

    def has_unfinished_requests(self) -> bool:
        """True while some request is waiting or running (an aborted one is finished at once,
        though the next `step()` still returns its output)."""
        with self._lock:
            return self.scheduler.has_unfinished_requests()

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of the requests it advanced or ended. Never
        raises because of one request: a request whose part of the step fails is finished
        with finish_reason "error" (its output's `error` says so) and the others go on."""
        with self._lock:
            try:
                return self._step()
            finally:
                self._take_aborts()

    def _step(self) -> list[RequestOutput]:
        """step()'s work (the lock is held)."""
        self._take_aborts()
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        self.runner.release(sched.finished_request_ids)
        if not sched.scheduled:
            return outputs
        batch, failed = self._runner_batch(sched)
        sampled = self._execute_isolating(batch, failed) if batch else {}
        self.num_steps += 1
        outputs += [self._fail(request_id, error) for request_id, error in failed.items()]
        return outputs + self._update(sched, sampled)

    def _execute_isolating(self, batch: list[ScheduledSequence], failed: dict[str, str]
                           ) -> dict[str, SampledToken]:
        """Execute `batch`; if it raises, execute each half alone, down to single requests,
        and record the ones that still fail in `failed`. Re-running is safe: a failed step
        advanced no counter, and re-computing a token rewrites the same KV slots."""
        try:
            return self.runner.execute(batch)
        except Exception as e:  # noqa: BLE001 - isolated below, logged with its traceback
            if len(batch) == 1:
                failed[batch[0].request_id] = self._describe_failure(batch[0].request_id, e)
                return {}
            logger.warning("a step of %d requests failed (%s); re-running them in halves to find "
                           "the failing one(s)", len(batch), type(e).__name__)
        mid = len(batch) // 2
        return {**self._execute_isolating(batch[:mid], failed),
                **self._execute_isolating(batch[mid:], failed)}

    @staticmethod
    def _describe_failure(request_id: str, error: BaseException) -> str:
        """Log the failure with its traceback; return the client-safe message."""
        logger.error("request %s failed in the engine", request_id, exc_info=error)
        return (f"request {request_id!r} failed in the engine ({type(error).__name__}); other "
                "requests were not affected; details are in the server log")

    def _fail(self, request_id: str, error: str) -> RequestOutput:
        req = self.scheduler.requests[request_id]
        req.error = error
        req.finish("error")
        self.scheduler.finish_request(request_id, "error")  # frees its KV blocks
        return self._make_output(req)

    def _runner_batch(self, sched: SchedulerOutput
                      ) -> tuple[list[ScheduledSequence], dict[str, str]]:
        """The runner's view of the scheduled requests, and {request id: error} for those whose
        view could not be built."""
        from inference_pio.runtime.model_runner import ScheduledSequence

        batch, failed = [], {}
        for s in sched.scheduled:
            req = self.scheduler.requests[s.request_id]
            try:
                batch.append(ScheduledSequence(
                    request_id=s.request_id, new_token_ids=s.new_token_ids,
                    num_cached_tokens=s.num_computed_tokens, block_ids=s.block_ids,
                    needs_sample=s.needs_sample, params=req.params,
                    prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids,
                    suppress_token_ids=req.stop_checker.suppress_token_ids(
                        len(req.output_token_ids)),
                ))
            except Exception as e:  # noqa: BLE001 - this request alone fails
                failed[s.request_id] = self._describe_failure(s.request_id, e)
        return batch, failed

    def _update(self, sched: SchedulerOutput, sampled: dict[str, SampledToken]
                ) -> list[RequestOutput]:
        tokens = {rid: tok.token_id for rid, tok in sampled.items()}
        outputs = []
        for req in self.scheduler.update_from_output(sched, tokens):
            try:
                self._process_token(req, sampled[req.request_id])
            except Exception as e:  # noqa: BLE001 - this request alone fails
                outputs.append(self._fail(req.request_id,
                                          self._describe_failure(req.request_id, e)))
                continue
            if req.is_finished:
                self.scheduler.finish_request(req.request_id, req.finish_reason or "stop")
            outputs.append(self._make_output(req))
        return outputs

    def _process_token(self, req: Request, token: SampledToken) -> None:
        """The scheduler appended the token; record logprobs, detokenize, check stops."""
        req.first_token_time = req.first_token_time or time.monotonic()
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
        req.output_text = (req.detokenizer.text if decision.finish_reason == "length"
                           else decision.text)
        req.finish(decision.finish_reason, decision.stop_reason)

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
            num_cached_tokens=req.num_cached_tokens, num_preemptions=req.num_preemptions,
        )
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), [completion],
                             req.is_finished, metrics, delta_text, delta_ids, error=req.error)


class _AbortHandoff:
    """An abort one thread asks of the step another thread is running."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.done = threading.Event()
        self.result: RequestOutput | None = None

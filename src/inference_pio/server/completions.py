"""Generation jobs: a request becomes engine choices plus the code that writes its answer.

A `Job` is what api_server runs: `choices` (one engine request each) and the methods that turn
engine outputs into a response (non-streaming) or SSE payloads (streaming). This module holds
the shared pieces (sampling params, context-length checks, usage, completion logprobs) and the
jobs of /v1/completions and /infill; chat.py holds the chat job."""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from inference_pio.engine.outputs import CompletionOutput, RequestOutput
from inference_pio.models.qwen3_coder_30b.code import (
    FIM_STOP_STRINGS,
    FIM_STOP_TOKEN_IDS,
    cut_fim_output,
    fim_prompt,
    repo_fim_prompt,
)
from inference_pio.sampling_params import SamplingParams
from inference_pio.server.protocol import (
    SEED_MAX,
    APIError,
    CompletionRequest,
    EngineClient,
    InfillRequest,
    SamplingFields,
    new_id,
    now,
)
from inference_pio.tokenizer import Tokenizer

Payload = dict[str, Any]
MAX_CHOICES = 64  # engine requests per HTTP request (prompts x n)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "seed", "ignore_eos", "min_tokens",
                    "stop_token_ids")
_FIELD_RE = re.compile(r"SamplingParams\.(\w+)")
_NON_FINITE_LOGPROB = -9999.0  # JSON has no -inf (vLLM uses the same stand-in)
# No token of the Qwen vocabulary decodes to more than 128 characters; NFC normalization can
# shrink text a few times over: a text longer than max_model_len * this cannot fit.
MAX_CHARS_PER_TOKEN = 128 * 4


@dataclass(frozen=True)
class TokenLimits:
    """Generated tokens: `default` when a request gives none, `limit` the most it may ask."""

    default: int = 2048
    limit: int = 16384


DEFAULT_LIMITS = TokenLimits()


@dataclass(frozen=True)
class Choice:
    """One engine request of a job; `counts_prompt` is False for a prompt's 2nd..nth sample,
    so usage counts each prompt once."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    counts_prompt: bool = True


class Job(ABC):
    """One HTTP request's engine choices and how its answer is written."""

    chunk_object = ""  # the "object" of streamed chunks
    sse_done = True  # end the SSE stream with `data: [DONE]`

    def __init__(self, choices: list[Choice], *, model: str, stream: bool,
                 include_usage: bool = False, id_prefix: str = "cmpl") -> None:
        self.choices, self.model, self.stream = choices, model, stream
        self.include_usage = include_usage
        self.id, self.created = new_id(id_prefix), now()

    @abstractmethod
    def chunks(self, index: int, out: RequestOutput) -> list[Payload]:
        """The SSE payloads for one engine output of choice `index`."""

    @abstractmethod
    def response(self, finals: dict[int, RequestOutput]) -> Payload:
        """The non-streaming answer, from each choice's final output."""

    def final_chunks(self, finals: dict[int, RequestOutput]) -> list[Payload]:
        """Payloads after every choice finished: the usage chunk when asked for."""
        return [self.envelope([], usage=self.usage(finals))] if self.include_usage else []

    def envelope(self, choices: list[Payload], **extra: Any) -> Payload:
        return {"id": self.id, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def usage(self, finals: dict[int, RequestOutput]) -> Payload:
        """Token counts as the engine saw them: prompt ids (once per prompt), generated ids."""
        prompt = sum(len(c.prompt_ids) for c in self.choices if c.counts_prompt)
        completion = sum(len(out.outputs[0].token_ids) for out in finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


# ----------------------------------------------------------------------------- shared helpers


def sampling_params(client: EngineClient, values: dict[str, Any]) -> SamplingParams:
    """The model's defaults with the request's explicit (non-None) values on top."""
    overrides = {key: value for key, value in values.items() if value is not None}
    try:
        return client.default_sampling_params(**overrides)
    except (ValueError, TypeError) as e:
        found = _FIELD_RE.search(str(e))
        raise APIError(400, str(e), param=found.group(1) if found else None) from None


def request_values(req: SamplingFields) -> dict[str, Any]:
    """The SamplingParams fields an OpenAI request sets."""
    values = {name: getattr(req, name) for name in _SAMPLING_FIELDS}
    values["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return values


def encode(tokenizer: Tokenizer, text: str, max_model_len: int, param: str) -> list[int]:
    """`text`'s token ids. A text too long to fit the context is refused (400) before it is
    tokenized; the tokenizer runs through encode_batch, which releases the GIL (a plain
    encode of a long string holds it, stalling the event loop's thread)."""
    if len(text) > max_model_len * MAX_CHARS_PER_TOKEN:
        raise APIError(400, f"{param} has {len(text)} characters, more than max_model_len="
                       f"{max_model_len} tokens can hold: shorten {param}", param=param,
                       code="context_length_exceeded")
    return list(tokenizer.backend.encode_batch([text], add_special_tokens=False)[0].ids)


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int,
                       prompt_param: str, limits: TokenLimits = DEFAULT_LIMITS) -> int:
    """`requested`, or `limits.default` capped by the room the context leaves; 400 when the
    two do not fit or `requested` is above `limits.limit`."""
    if requested is not None and requested > limits.limit:
        raise APIError(400, f"max_tokens {requested} is above this server's limit of "
                       f"{limits.limit} (its --max-tokens-limit): ask for fewer",
                       param="max_tokens")
    room = max_model_len - num_prompt_tokens
    if num_prompt_tokens == 0:
        raise APIError(400, f"{prompt_param} is empty: give at least one token",
                       param=prompt_param)
    if room < 1:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens but max_model_len is "
                       f"{max_model_len}, leaving no room to generate: shorten {prompt_param}",
                       param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return min(room, limits.default)
    if requested > room:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens and max_tokens is "
                       f"{requested}: together they exceed max_model_len={max_model_len}; "
                       f"lower max_tokens to {room} or less", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def expand_choices(prompts: Sequence[tuple[list[int], SamplingParams]], n: int) -> list[Choice]:
    """n choices per prompt; sample j > 0 of a seeded request gets seed + j, so the n samples
    differ yet the whole answer stays reproducible."""
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} "
                       "sequences in one request: lower n or send fewer prompts", param="n")
    choices: list[Choice] = []
    for ids, params in prompts:
        for j in range(n):
            choices.append(Choice(len(choices), ids, _nth_seed(params, j), j == 0))
    return choices


def _nth_seed(params: SamplingParams, j: int) -> SamplingParams:
    if params.seed is None or j == 0:
        return params
    seed = params.seed + j if params.seed + j <= SEED_MAX else params.seed - j
    return replace(params, seed=seed)


def with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    try:
        return replace(params, max_tokens=max_tokens)
    except ValueError as e:  # e.g. min_tokens above the room left
        raise APIError(400, str(e), param="min_tokens") from None


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _NON_FINITE_LOGPROB


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def delta_logprobs(out: RequestOutput) -> tuple[list[int], list[dict[int, float]]]:
    """The ids new in this output and their logprob dicts."""
    comp = out.outputs[0]
    ids = out.delta_token_ids
    entries = comp.logprobs or []
    return ids, entries[max(0, len(entries) - len(ids)):] if ids else []


class CompletionLogprobs:
    """OpenAI completions `logprobs` for one choice; `text_offset` counts from the start of the
    generated text and carries on across streamed chunks."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0

    def format(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> Payload:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float]] = []
        offsets: list[int] = []
        for token_id, entry in zip(token_ids, logprobs, strict=False):
            text = token_text(self.tokenizer, token_id)
            tokens.append(text)
            sampled = entry.get(token_id)
            token_logprobs.append(None if sampled is None else finite(sampled))
            ranked: dict[str, float] = {}
            for t, v in sorted(entry.items(), key=lambda item: -item[1]):
                ranked.setdefault(token_text(self.tokenizer, t), finite(v))
            top.append(ranked)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}


# ----------------------------------------------------------------------------- /v1/completions


class CompletionJob(Job):
    chunk_object = "text_completion"

    def __init__(self, choices: list[Choice], req: CompletionRequest, model: str,
                 tokenizer: Tokenizer) -> None:
        super().__init__(choices, model=model, stream=req.stream,
                         include_usage=req.include_usage, id_prefix="cmpl")
        self.tokenizer = tokenizer
        self.is_fim = req.suffix is not None
        self.want_logprobs = req.logprobs is not None
        self.logprobs = {c.index: CompletionLogprobs(tokenizer) for c in choices}

    def chunks(self, index: int, out: RequestOutput) -> list[Payload]:
        finish = out.outputs[0].finish_reason if out.finished else None
        logprobs = None
        if self.want_logprobs:
            logprobs = self.logprobs[index].format(*delta_logprobs(out))
        if not out.delta_text and finish is None and not (logprobs and logprobs["tokens"]):
            return []
        return [self.envelope([{"index": index, "text": out.delta_text, "logprobs": logprobs,
                                "finish_reason": finish}])]

    def response(self, finals: dict[int, RequestOutput]) -> Payload:
        choices = [self._choice(i, finals[i].outputs[0]) for i in sorted(finals)]
        return self.envelope(choices, usage=self.usage(finals))

    def _choice(self, index: int, comp: CompletionOutput) -> Payload:
        logprobs = None
        if self.want_logprobs:
            logprobs = CompletionLogprobs(self.tokenizer).format(comp.token_ids,
                                                                 comp.logprobs or [])
        text = cut_fim_output(comp.text) if self.is_fim else comp.text
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": comp.finish_reason}


def completion_job(req: CompletionRequest, client: EngineClient, model: str,
                   limits: TokenLimits = DEFAULT_LIMITS) -> CompletionJob:
    """Check and expand a /v1/completions request. With `suffix`, each text prompt becomes a
    fill-in-the-middle prompt (prefix = the prompt) that stops on the FIM stop tokens."""
    if req.echo:
        raise APIError(400, "echo is not supported: the engine does not score prompt tokens",
                       param="echo")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    prompts = _prompt_list(req.prompt)
    values = {**request_values(req), "logprobs": req.logprobs, "max_tokens": req.max_tokens}
    if req.suffix is not None:
        if not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "suffix needs text prompts, not token ids", param="suffix")
        prompts = [fim_prompt(str(p), req.suffix) for p in prompts]
        values["stop"] = (*values["stop"], *FIM_STOP_STRINGS)
        values["stop_token_ids"] = (*(req.stop_token_ids or ()), *FIM_STOP_TOKEN_IDS)
    base = sampling_params(client, values)
    encoded = []
    for prompt in prompts:
        ids = (encode(client.tokenizer, prompt, client.max_model_len, "prompt")
               if isinstance(prompt, str) else list(prompt))
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), client.max_model_len,
                                        "prompt", limits)
        encoded.append((ids, with_max_tokens(base, max_tokens)))
    return CompletionJob(expand_choices(encoded, req.n), req, model, client.tokenizer)


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]
                 ) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [[p for p in prompt if isinstance(p, int)]]  # one prompt as token ids
    return [p if isinstance(p, str) else list(p) for p in prompt if not isinstance(p, int)]


# ----------------------------------------------------------------------------- /infill


class InfillJob(Job):
    """llama-server's /infill answer: {"content": ...}; streamed as `data: {"content",
    "stop"}` payloads, without a [DONE] marker (as llama-server)."""

    sse_done = False

    def chunks(self, index: int, out: RequestOutput) -> list[Payload]:
        if not out.delta_text and not out.finished:
            return []
        payload: Payload = {"content": out.delta_text, "stop": out.finished}
        return [{**payload, **self._summary(out)} if out.finished else payload]

    def response(self, finals: dict[int, RequestOutput]) -> Payload:
        out = finals[0]
        return {"content": cut_fim_output(out.outputs[0].text), **self._summary(out)}

    def final_chunks(self, finals: dict[int, RequestOutput]) -> list[Payload]:
        return []

    def _summary(self, out: RequestOutput) -> Payload:
        comp = out.outputs[0]
        stop_type = ("limit" if comp.finish_reason == "length"
                     else "word" if isinstance(comp.stop_reason, str) else "eos")
        return {"model": self.model, "stop": True, "stop_type": stop_type,
                "tokens_predicted": len(comp.token_ids),
                "tokens_evaluated": len(out.prompt_token_ids)}


def infill_job(req: InfillRequest, client: EngineClient, model: str,
               limits: TokenLimits = DEFAULT_LIMITS) -> InfillJob:
    """A repo-level FIM prompt when `input_extra` gives context files, else a file-level one;
    `prompt` (llama-server: text the middle starts with) follows the FIM prompt."""
    if req.n_predict == 0 or req.n_predict < -1:
        raise APIError(400, "n_predict must be -1 (until a stop token) or >= 1",
                       param="n_predict")
    try:
        text = _infill_prompt(req)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="input_extra") from None
    ids = encode(client.tokenizer, text, client.max_model_len, "input_prefix")
    max_tokens = resolve_max_tokens(None if req.n_predict < 0 else req.n_predict, len(ids),
                                    client.max_model_len, "input_prefix", limits)
    params = sampling_params(client, {
        "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
        "min_p": req.min_p, "repetition_penalty": req.repeat_penalty, "seed": req.seed,
        "stop": (*(req.stop or ()), *FIM_STOP_STRINGS), "stop_token_ids": FIM_STOP_TOKEN_IDS,
        "max_tokens": max_tokens})
    return InfillJob([Choice(0, ids, params)], model=model, stream=req.stream)


def _infill_prompt(req: InfillRequest) -> str:
    if not req.input_extra:
        return fim_prompt(req.input_prefix, req.input_suffix) + req.prompt
    files = [(extra.filename, extra.text) for extra in req.input_extra]
    return repo_fim_prompt(req.repo_name, files, req.filename, req.input_prefix,
                           req.input_suffix) + req.prompt

"""The server's contracts: pydantic models of the OpenAI (and llama-server) request schemas, the
OpenAI error object and body reading, and the `EngineClient` protocol the endpoints generate
through.

Requests are validated here and nowhere else: a `ValidationError` becomes a 400 naming the field
(`validation_error`). Unknown fields are ignored, as OpenAI clients send extras (`user`, ...).
Responses are plain dicts built by chat.py / completions.py: their shape is fixed and the
official client validates it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from inference_pio.engine.async_engine import EngineFailedError
from inference_pio.server.limits import find_lone_surrogate

if TYPE_CHECKING:
    from inference_pio.engine.outputs import RequestOutput
    from inference_pio.sampling_params import SamplingParams
    from inference_pio.server.metrics import EngineStats
    from inference_pio.tokenizer import Tokenizer

_logger = logging.getLogger(__name__)
MAX_N = 16  # choices per prompt; each is one engine request
MAX_PROMPTS = 64  # prompts per completions request
MAX_LOGPROBS = 20  # vLLM's default cap; the sampler's top-k runs over the whole vocabulary
MAX_STOP = 16
# torch.Generator.manual_seed takes int64 or uint64: anything else would fail an engine step
# (and with it every request in the batch), so it is refused here.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class APIError(Exception):
    """An error for the client, rendered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code)
        self.headers = headers

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(error: ValidationError) -> APIError:
    """A 400 naming the first offending field (dotted path) and up to three problems."""
    by_field: dict[str, list[str]] = {}
    for problem in error.errors():  # a union reports one problem per member: group them
        by_field.setdefault(_loc(problem["loc"]), []).append(problem["msg"])
    parts = [f"{field or 'body'}: {' or '.join(dict.fromkeys(msgs))}"
             for field, msgs in list(by_field.items())[:3]]
    more = f" (and {len(by_field) - 3} more fields)" if len(by_field) > 3 else ""
    return APIError(400, "invalid request: " + "; ".join(parts) + more,
                    param=next(iter(by_field), None) or None)


def _loc(loc: tuple[int | str, ...]) -> str:
    # Unions add the member's type to the path ("prompt.list[int]"): keep only real fields.
    return ".".join(str(p) for p in loc if isinstance(p, int) or _is_field_name(p))


_FIELD_RE = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field_name(part: str) -> bool:
    return bool(_FIELD_RE.fullmatch(part)) and part not in _TYPE_NAMES


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)]


class StreamOptions(_Model):
    include_usage: bool = False


class SamplingFields(_Model):
    """Fields shared by completions and chat; None means "the model's default"."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False  # vLLM extra
    min_tokens: int = Field(0, ge=0)  # vLLM extra
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
Prompt = (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
          | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])


class CompletionRequest(SamplingFields):
    prompt: Prompt
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=256, pattern=r"^[^<>=\s]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseFormat(_Model):
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None


class InputExtra(_Model):
    filename: str = "tmp"  # llama-server's default
    text: str = ""


class InfillRequest(_Model):
    """llama-server's /infill. `repo_name` and `filename` (the target file's path, used with
    `input_extra`) are extensions; llama-server hard-codes "myproject" and "filename"."""

    model: str | None = None
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InputExtra] = Field(default_factory=list)
    prompt: str = ""
    repo_name: str | None = None
    filename: str = "filename"
    n_predict: int = -1
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: Seed | None = None
    stop: list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False


class TokenizeRequest(_Model):
    content: str | None = None
    prompt: str | None = None


class DetokenizeRequest(_Model):
    tokens: list[StrictInt]


class EngineClient(Protocol):
    """What the server needs of an engine; `LLMEngineClient` adapts `LLM`, tests pass fakes.

    `generate` streams one request's outputs (`delta_text` / `delta_token_ids`, the last one
    `finished`); it raises `RequestError` (or ValueError) for a request the engine refuses, at
    the latest with its first output, and aborts the request when closed early. `abort` is
    synchronous and idempotent. `max_model_len` is the longest prompt + output it serves;
    `max_num_seqs` how many requests it runs at once (the server queues at most
    max_queued_requests more); `ready` is False while it is still loading (/health: 503)."""

    tokenizer: Tokenizer
    max_model_len: int
    max_num_seqs: int

    @property
    def ready(self) -> bool: ...

    def generate(self, prompt: list[int], params: SamplingParams, request_id: str
                 ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def default_sampling_params(self, **overrides: Any) -> SamplingParams: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


# ----------------------------------------------------------------------------- HTTP plumbing


class ClientDisconnected(Exception):
    """The client left before the answer was ready; nobody is there to read a response."""


def engine_error(error: BaseException, request_id: str) -> BaseException:
    """What to raise for an exception out of the engine: refused requests become 400s; any
    other failure a 500 that names `request_id` but never the internal error (logged here)."""
    if isinstance(error, (APIError, asyncio.CancelledError)):
        return error
    if isinstance(error, ValueError):  # RequestError and SamplingParams' own checks
        text = str(error)
        param = next((p for p in ("max_tokens", "prompt") if p in text), None)
        return APIError(400, text, param=param)
    if not _is_engine_failure(error):  # the engine thread logged its own failures already
        _logger.error("request %s failed: %r", request_id, error, exc_info=error)
    return request_failed(request_id)


def request_failed(request_id: str) -> APIError:
    return APIError(500, f"the engine failed to run request {request_id}; the server log has "
                    "the details under that id", type="internal_error", code="engine_error")


def _is_engine_failure(error: BaseException) -> bool:
    return isinstance(error, EngineFailedError)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body: 413 past `max_bytes`, 408 (connection closed) when it has not all
    arrived within `timeout_s`, ClientDisconnected when the client leaves mid-upload."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(max_bytes)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """The body as JSON (strict: no NaN/Infinity); 400 when malformed or when a string is not
    valid Unicode (a lone surrogate such as "\\ud800"), naming the field."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    where = find_lone_surrogate(value)
    if where is not None:
        raise APIError(400, f"{where} is not valid Unicode text (it holds a lone surrogate such "
                       "as \\ud800): send UTF-8 text", param=where)
    return value


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the body is larger than {max_bytes} bytes", type="invalid_request_error",
                    code="request_too_large")


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> Response:
        error = APIError(400, f"invalid request: {exc.errors()}")
        return JSONResponse(error.to_dict(), status_code=400)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        _logger.exception("unhandled error on %s", request.url.path)
        error = APIError(500, "internal server error", type="internal_error")
        return JSONResponse(error.to_dict(), status_code=500)

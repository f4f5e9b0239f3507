"""The OpenAI-compatible HTTP server: FastAPI routes over an `EngineClient`.

The event loop only moves bytes: the body is read on the loop (with a deadline), then parsed,
validated, templated and tokenized into a `Job` in a worker thread; the engine hand-off is a
queue put (engine/async_engine.py). A request is parsed (protocol.py), turned into a `Job`
(completions.py / chat.py) and run here:
its engine requests are submitted and primed (a refused one is a 400 before any byte is sent),
then merged into one stream that is either collected (watching for the client to leave) or sent
as SSE. Whichever way a response ends, `ChoiceStream.close()` aborts what is still running, so
a client that disconnects frees its KV blocks at once."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from inference_pio.engine.outputs import RequestOutput
from inference_pio.server.chat import chat_job
from inference_pio.server.completions import Job, TokenLimits, completion_job, encode, infill_job
from inference_pio.server.config import ServerConfig
from inference_pio.server.limits import BrowserGuard
from inference_pio.server.metrics import CONTENT_TYPE, RequestCounter, RequestTimer, ServerMetrics
from inference_pio.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ClientDisconnected,
    CompletionRequest,
    DetokenizeRequest,
    EngineClient,
    InfillRequest,
    TokenizeRequest,
    add_error_handlers,
    engine_error,
    now,
    parse_json,
    read_body,
    request_failed,
    validation_error,
)

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = ServerConfig.max_body_bytes
DISCONNECT_POLL_S = 0.2
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/infill", "/tokenize", "/detokenize")


class ChoiceStream:
    """A job's engine requests, their outputs merged in arrival order as (choice index, output).
    `close()` (sync, idempotent) aborts every unfinished request: call it in a `finally`."""

    def __init__(self, client: EngineClient, job: Job, metrics: ServerMetrics,
                 on_close: Callable[[], None] = lambda: None) -> None:
        self.client, self.job, self._on_close = client, job, on_close
        self.request_ids = {c.index: f"{job.id}-{c.index}" for c in job.choices}
        self.finals: dict[int, RequestOutput] = {}
        self._unfinished = set(self.request_ids)
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers = {i: RequestTimer(metrics) for i in self.request_ids}

    async def open(self) -> None:
        """Submit every choice and wait for each one's first output: a refused request raises
        here, before the response starts."""
        agens = [self.client.generate(c.prompt_ids, c.params, self.request_ids[c.index])
                 for c in self.job.choices]
        firsts: list[RequestOutput] = []
        try:
            for first in await asyncio.gather(*(anext(a) for a in agens),
                                              return_exceptions=True):
                if isinstance(first, BaseException):
                    raise engine_error(first, self.job.id)
                firsts.append(first)
        except BaseException:
            self.close()
            raise
        for choice, agen, first in zip(self.job.choices, agens, firsts, strict=True):
            if _failed(first):
                self.close()
                raise request_failed(self.request_ids[choice.index])
            self._queue.put_nowait((choice.index, first))
            if not first.finished:
                self._tasks.append(asyncio.ensure_future(self._pump(choice.index, agen)))

    async def _pump(self, index: int, agen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in agen:
                self._queue.put_nowait((index, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which owns the response
            self._queue.put_nowait((index, e))

    def __aiter__(self) -> ChoiceStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        index, item = await self._queue.get()
        if isinstance(item, BaseException) or _failed(item):
            self.close()
            if isinstance(item, BaseException):
                raise engine_error(item, self.request_ids[index])
            raise request_failed(self.request_ids[index])
        timer = self._timers[index]
        timer.on_tokens(len(item.delta_token_ids))
        if item.finished:
            self._unfinished.discard(index)
            self.finals[index] = item
            timer.on_finish(len(item.prompt_token_ids), len(item.outputs[0].token_ids))
        return index, item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for index in sorted(self._unfinished):
            self.client.abort(self.request_ids[index])
        self._unfinished.clear()
        on_close, self._on_close = self._on_close, lambda: None
        on_close()


def _failed(out: RequestOutput) -> bool:
    """The engine finished this request with an error (only this request failed)."""
    return out.finished and out.outputs[0].finish_reason == "error"


class SSEResponse(StreamingResponse):
    """Closes the stream however the response ends, even when the client left before the
    body iterator started (then its own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _sse_events(job: Job, stream: ChoiceStream) -> AsyncIterator[str]:
    try:
        async for index, out in stream:
            for payload in job.chunks(index, out):
                yield _sse(payload)
        for payload in job.final_chunks(stream.finals):
            yield _sse(payload)
        if job.sse_done:
            yield "data: [DONE]\n\n"
    except APIError as e:  # the engine failed mid-stream: the status line is already sent
        yield _sse(e.to_dict())
    finally:
        stream.close()


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected (with `work` cancelled) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # no-op once done
    if task in done:
        return task.result()
    raise ClientDisconnected()


async def _drain(stream: ChoiceStream) -> dict[int, RequestOutput]:
    async for _ in stream:
        pass
    return stream.finals


class _Server:
    """The state routes share; one per app."""

    def __init__(self, client: EngineClient, names: tuple[str, ...], config: ServerConfig,
                 metrics: ServerMetrics) -> None:
        self.client, self.names, self.config, self.metrics = client, names, config, metrics
        self.api_key = config.api_key
        self.limits = TokenLimits(config.default_max_tokens, config.max_tokens_limit)
        self.created = now()
        self.active = 0  # engine requests admitted and not yet closed

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, model: type[M]) -> M:
        """Read the body on the loop, then parse and validate it in a worker thread."""
        body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
        return await run_in_threadpool(self.validate, body, model)

    def validate(self, body: bytes, model: type[M]) -> M:
        try:
            parsed = model.model_validate(parse_json(body))
        except ValidationError as e:
            raise validation_error(e) from None
        self.check_model(getattr(parsed, "model", None))
        return parsed

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.names))}", param="model",
                           type="not_found_error", code="model_not_found")

    def answer_name(self, requested: str | None) -> str:
        """The model name a response reports: the one the request used, else the first."""
        return requested if requested in self.names else self.names[0]

    def admit(self, num_requests: int) -> Callable[[], None]:
        """Count `num_requests` engine requests in; 503 with Retry-After when the engine's
        batch plus the waiting queue (max_queued_requests) would overflow. Returns the
        release to call once."""
        capacity = self.client.max_num_seqs + self.config.max_queued_requests
        if self.active + num_requests > capacity:
            raise APIError(503, f"the server is busy ({self.active} requests running or "
                           "queued): retry shortly", type="server_busy", code="queue_full",
                           headers={"Retry-After": "1"})
        self.active += num_requests

        def release() -> None:
            self.active -= num_requests

        return release

    async def run(self, job: Job, request: Request) -> Response:
        stream = ChoiceStream(self.client, job, self.metrics, self.admit(len(job.choices)))
        try:
            await until_disconnect(request, stream.open())
        except BaseException:
            stream.close()
            raise
        if job.stream:
            return SSEResponse(_sse_events(job, stream), stream.close)
        try:
            finals = await until_disconnect(request, _drain(stream))
        finally:
            stream.close()
        return JSONResponse(job.response(finals))

    def model_cards(self) -> list[dict[str, Any]]:
        return [{"id": name, "object": "model", "created": self.created,
                 "owned_by": "inference-pio", "max_model_len": self.client.max_model_len}
                for name in self.names]

    def parse_failure(self) -> None:
        self.metrics.tool_call_parse_failures.inc()


def build_app(engine_client: EngineClient, *, model_name: str | Sequence[str],
              config: ServerConfig | None = None, api_key: str | None = None,
              max_body_bytes: int | None = None) -> FastAPI:
    """The FastAPI app answering to `model_name` (a name or several, the first reported by
    default). Every route but /health and /metrics needs the API key when one is set.
    `api_key` / `max_body_bytes` override `config`'s."""
    config = config or ServerConfig()
    if api_key is not None:
        config = replace(config, api_key=api_key)
    if max_body_bytes is not None:
        config = replace(config, max_body_bytes=max_body_bytes)
    names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
    metrics = ServerMetrics()
    server = _Server(engine_client, names, config, metrics)
    app = FastAPI(title="inference-pio", lifespan=_lifespan(engine_client), docs_url=None,
                  redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=metrics, paths=ROUTES)
    app.add_middleware(BrowserGuard, allowed_hosts=config.host_allowlist())
    if config.allowed_origins:  # added last: outermost, so preflights are answered first
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_public_routes(app, server)
    _add_generation_routes(app, server)
    _add_token_routes(app, server)
    return app


def _lifespan(client: EngineClient) -> Callable[[FastAPI], Any]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.shutdown()

    return lifespan


def _add_public_routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.check_key)]

    @app.get("/health")
    async def health() -> Response:
        """200 {"status": "ok"} once the model and the native kernels are ready, before that
        503 {"status": "loading"}."""
        if server.client.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(server.client.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": server.model_cards()})

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> Response:
        server.check_model(model_id)
        card = next(c for c in server.model_cards() if c["id"] == model_id)
        return JSONResponse(card)


def _add_generation_routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.check_key)]
    client, limits = server.client, server.limits

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = await server.parse(request, CompletionRequest)
        job = await run_in_threadpool(completion_job, req, client,
                                      server.answer_name(req.model), limits)
        return await server.run(job, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = await server.parse(request, ChatCompletionRequest)
        job = await run_in_threadpool(chat_job, req, client, server.answer_name(req.model),
                                      server.parse_failure, limits)
        return await server.run(job, request)

    @app.post("/infill", dependencies=auth)
    async def infill(request: Request) -> Response:
        req = await server.parse(request, InfillRequest)
        job = await run_in_threadpool(infill_job, req, client, server.answer_name(req.model),
                                      limits)
        return await server.run(job, request)


def _add_token_routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.check_key)]
    tokenizer = server.client.tokenizer
    max_len = server.client.max_model_len

    def tokenize_text(req: TokenizeRequest) -> list[int]:
        text = req.content if req.content is not None else req.prompt
        if text is None:
            raise APIError(400, "give the text to tokenize as `content` (or `prompt`)",
                           param="content")
        return encode(tokenizer, text, max_len, "content" if req.content is not None
                      else "prompt")

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> Response:
        req = await server.parse(request, TokenizeRequest)
        ids = await run_in_threadpool(tokenize_text, req)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": max_len})

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> Response:
        req = await server.parse(request, DetokenizeRequest)
        text = await run_in_threadpool(tokenizer.decode, req.tokens)
        return JSONResponse({"content": text, "prompt": text})

"""The OpenAI-compatible HTTP server: FastAPI routes over an `EngineClient`.

A request is parsed (protocol.py), turned into a `Job` (completions.py / chat.py) and run here:
its engine requests are submitted and primed (a refused one is a 400 before any byte is sent),
then merged into one stream that is either collected (watching for the client to leave) or sent
as SSE. Whichever way a response ends, `ChoiceStream.close()` aborts what is still running, so
a client that disconnects frees its KV blocks at once."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from inference_pio.engine.outputs import RequestOutput
from inference_pio.server.chat import chat_job
from inference_pio.server.completions import Job, completion_job, infill_job
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
    read_json,
    validation_error,
)

logger = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECT_POLL_S = 0.2
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/infill", "/tokenize", "/detokenize")


class ChoiceStream:
    """A job's engine requests, their outputs merged in arrival order as (choice index, output).
    `close()` (sync, idempotent) aborts every unfinished request: call it in a `finally`."""

    def __init__(self, client: EngineClient, job: Job, metrics: ServerMetrics) -> None:
        self.client, self.job = client, job
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
                    raise engine_error(first)
                firsts.append(first)
        except BaseException:
            self.close()
            raise
        for choice, agen, first in zip(self.job.choices, agens, firsts, strict=True):
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
        if isinstance(item, BaseException):
            self.close()
            raise engine_error(item)
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

    def __init__(self, client: EngineClient, model_name: str, api_key: str | None,
                 max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.client, self.model_name, self.api_key = client, model_name, api_key
        self.max_body_bytes, self.metrics = max_body_bytes, metrics
        self.created = now()

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, model: type[M]) -> M:
        body = await read_json(request, self.max_body_bytes)
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        self.check_model(getattr(parsed, "model", None))
        return parsed

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", type="not_found_error",
                           code="model_not_found")

    async def run(self, job: Job, request: Request) -> Response:
        stream = ChoiceStream(self.client, job, self.metrics)
        await until_disconnect(request, stream.open())
        if job.stream:
            return SSEResponse(_sse_events(job, stream), stream.close)
        try:
            finals = await until_disconnect(request, _drain(stream))
        finally:
            stream.close()
        return JSONResponse(job.response(finals))

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "inference-pio", "max_model_len": self.client.max_model_len}

    def parse_failure(self) -> None:
        self.metrics.tool_call_parse_failures.inc()


def build_app(engine_client: EngineClient, *, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app. Every route but /health and /metrics needs `api_key` when one is set."""
    metrics = ServerMetrics()
    server = _Server(engine_client, model_name, api_key, max_body_bytes, metrics)
    app = FastAPI(title="inference-pio", lifespan=_lifespan(engine_client), docs_url=None,
                  redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=metrics, paths=ROUTES)
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
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(server.client.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [server.model_card()]})

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> Response:
        server.check_model(model_id)
        return JSONResponse(server.model_card())


def _add_generation_routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.check_key)]
    client, name = server.client, server.model_name

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = await server.parse(request, CompletionRequest)
        return await server.run(completion_job(req, client, name), request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = await server.parse(request, ChatCompletionRequest)
        return await server.run(chat_job(req, client, name, server.parse_failure), request)

    @app.post("/infill", dependencies=auth)
    async def infill(request: Request) -> Response:
        req = await server.parse(request, InfillRequest)
        return await server.run(infill_job(req, client, name), request)


def _add_token_routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.check_key)]
    tokenizer = server.client.tokenizer

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> Response:
        req = await server.parse(request, TokenizeRequest)
        text = req.content if req.content is not None else req.prompt
        if text is None:
            raise APIError(400, "give the text to tokenize as `content` (or `prompt`)",
                           param="content")
        ids = tokenizer.encode(text)
        return JSONResponse({"tokens": ids, "count": len(ids),
                             "max_model_len": server.client.max_model_len})

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> Response:
        req = await server.parse(request, DetokenizeRequest)
        text = tokenizer.decode(req.tokens)
        return JSONResponse({"content": text, "prompt": text})

"""Connection and browser guards around the app:

- `TimedH11Protocol`: uvicorn's h11 protocol with a header deadline (a connection that has not
  sent complete request headers `header_timeout_s` after opening, or after the first byte of
  a keep-alive request, is closed). uvicorn itself has only a keep-alive timeout.
- `BrowserGuard` (ASGI middleware): Host header allowlist (DNS rebinding: 400 for other
  names) and a JSON content type on POST bodies (a cross-origin "simple" text/plain POST is a
  415, so a web page cannot drive the API without a CORS preflight).
- `find_lone_surrogate`: the dotted path of the first string in a parsed JSON body that is not
  valid Unicode text (JSON allows "\\ud800"; UTF-8 does not)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """H11Protocol with a deadline on the request headers. Make one per connection with
    `TimedH11Protocol.factory(header_timeout_s)` as uvicorn's `http` setting."""

    header_timeout_s = 10.0

    @classmethod
    def factory(cls, header_timeout_s: float) -> type[TimedH11Protocol]:
        return type("TimedH11Protocol", (cls,), {"header_timeout_s": header_timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.conn.their_state is h11.IDLE and not busy and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request headers "
                             "within %.0f s", self.header_timeout_s)
            self.transport.close()


def _error_body(status: int, message: str, param: str | None, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": param, "code": code}}).encode()


class BrowserGuard:
    """ASGI middleware: 400 for a Host header outside `allowed_hosts` (None: any), 415 for a
    POST whose body is not declared `application/json`."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            await _reply(send, 400, _error_body(
                400, f"Host {host!r} is not allowed: connect by a loopback name or the bound "
                "address, or start the server with --allowed-hosts NAME", None,
                "host_not_allowed"))
            return
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                shown = kind.decode("latin-1") or "none"
                await _reply(send, 415, _error_body(
                    415, f"Content-Type {shown!r} is not supported: send the body as JSON with "
                    "'Content-Type: application/json'", None, "unsupported_media_type"))
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The Host header without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def find_lone_surrogate(value: Any, path: Iterable[str | int] = ()) -> str | None:
    """The dotted path ('messages.0.content') of the first string (key or value) in `value`
    that cannot be encoded as UTF-8 (a lone surrogate), or None."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, tuple(path))]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return ".".join(str(p) for p in where) or "body"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if find_lone_surrogate(key) is not None:
                    return ".".join(str(p) for p in (*where, "<key>")) or "body"
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, i)) for i, child in reversed(list(enumerate(item))))
    return None

"""ServerConfig: every setting of the HTTP server in one frozen dataclass. The `pio serve` flags
are derived from its fields (`add_server_args`, `from_args`): a field's metadata holds its
flag help, so a default is stated once, here.

Limits, and what a client sees when it hits one:
- header_timeout_s: the request line and headers must arrive within this many seconds of the
  first byte (or of the connection opening); otherwise the connection is closed.
- body_timeout_s: the whole body must arrive within this; otherwise 408 and the connection
  is closed.
- max_connections: open connections beyond this get 503 (uvicorn's limit_concurrency).
- max_queued_requests: engine requests beyond the engine's batch (max_num_seqs) that may wait;
  a request that would exceed it gets 503 with `Retry-After`.
- default_max_tokens / max_tokens_limit: generated tokens when a request gives none (chat,
  /infill n_predict -1), and the most a request may ask for (400 above it).
- max_body_bytes: 413 above it."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def _opt(default: Any, help: str, **flag: Any) -> Any:
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class ServerConfig:
    """What `run_server` / `build_app` serve with; validated on construction (ValueError
    naming the flag)."""

    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on (0-65535)")
    api_key: str | None = _opt(None, "require this bearer key (default: "
                               "$INFERENCE_PIO_API_KEY, else none)")
    served_model_name: tuple[str, ...] = _opt(
        (), "names clients may use in `model` (one or more); the server also answers to "
        "--model as given and the model directory's name", nargs="+")
    allowed_hosts: tuple[str, ...] = _opt(
        (), "Host header values accepted besides the loopback names and --host (DNS-rebinding "
        "guard); '*' accepts any", nargs="+")
    allowed_origins: tuple[str, ...] = _opt(
        (), "browser origins allowed by CORS, e.g. http://localhost:3000 (default: none, CORS "
        "off)", nargs="+")
    max_body_bytes: int = _opt(4 * 1024 * 1024, "largest request body in bytes (413 above)")
    header_timeout_s: float = _opt(10.0, "seconds a client has to send the request headers")
    body_timeout_s: float = _opt(30.0, "seconds a client has to send the whole request body")
    keep_alive_timeout_s: int = _opt(5, "seconds an idle keep-alive connection stays open")
    max_connections: int = _opt(256, "concurrent connections; more get 503")
    max_queued_requests: int = _opt(
        256, "engine requests waiting beyond the running batch; more get 503 with Retry-After")
    default_max_tokens: int = _opt(
        2048, "generated tokens when a request gives no max_tokens (capped by the context)")
    max_tokens_limit: int = _opt(16384, "the most generated tokens one request may ask for")
    log_level: str = _opt("info", "uvicorn's log level", choices=[
        "critical", "error", "warning", "info", "debug", "trace"])

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a port number (0-65535)")
        for name in ("max_body_bytes", "max_connections", "default_max_tokens",
                     "max_tokens_limit", "keep_alive_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be at least 1")
        if self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be 0 or more")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not 0 < getattr(self, name) < 86400:
                raise ValueError(f"--{_flag(name)} must be a number of seconds above 0")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"--default-max-tokens {self.default_max_tokens} is above "
                             f"--max-tokens-limit {self.max_tokens_limit}: lower it")
        for origin in self.allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"--allowed-origins {origin!r}: give scheme://host[:port], "
                                 "e.g. http://localhost:3000")
        if any(not name.strip() for name in self.served_model_name):
            raise ValueError("--served-model-name: names must not be empty")

    def host_allowlist(self) -> frozenset[str] | None:
        """Host header names accepted (lower case, no port); None accepts any."""
        if "*" in self.allowed_hosts:
            return None
        names = {*LOOPBACK_HOSTS, *(h.lower() for h in self.allowed_hosts)}
        if self.host not in WILDCARD_BINDS:
            names.add(self.host.lower())
        return frozenset(names)

    def bind_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _flag(name: str) -> str:
    return name.removesuffix("_s").replace("_", "-") if name.endswith("timeout_s") else \
        name.replace("_", "-")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def add_server_args(group: Any) -> None:
    """One flag per ServerConfig field, with its default and help."""
    for f in dataclasses.fields(ServerConfig):
        meta = dict(f.metadata)
        kwargs: dict[str, Any] = {"default": f.default, "help": meta.pop("help")}
        kwargs.update(meta)
        if f.name == "port":
            kwargs["type"] = _port
        elif "nargs" in meta:
            kwargs["metavar"] = "NAME" if f.name != "allowed_origins" else "ORIGIN"
        elif isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, (int, float)):
            kwargs["type"] = type(f.default)
        if f.default is not None and "choices" not in meta and f.name not in ("api_key",):
            kwargs["help"] += " (default: %(default)s)" if f.default != () else ""
        group.add_argument(f"--{_flag(f.name)}", dest=f.name, **kwargs)


def from_args(args: argparse.Namespace, **overrides: Any) -> ServerConfig:
    """The ServerConfig the parsed flags describe (list flags become tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    values.update(overrides)
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return ServerConfig(**values)

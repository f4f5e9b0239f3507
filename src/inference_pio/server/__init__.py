"""The OpenAI-compatible server: `build_app(engine_client, model_name=...)` for any
`EngineClient`, `LLMEngineClient(llm)` to serve an `LLM`, and `run_server(llm, config)`
(`pio serve`). The names load lazily, so `server.config` (the flags `pio --help` shows) costs
no uvicorn, FastAPI or torch import."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_MAX_BODY_BYTES": "api_server", "build_app": "api_server",
    "EngineClient": "protocol", "EngineStats": "metrics", "ServerConfig": "config",
    "LLMEngineClient": "serve", "default_model_name": "serve", "run_server": "serve",
    "served_names": "serve"}

__all__ = ["DEFAULT_MAX_BODY_BYTES", "EngineClient", "EngineStats", "LLMEngineClient",
           "ServerConfig", "build_app", "default_model_name", "run_server", "served_names"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

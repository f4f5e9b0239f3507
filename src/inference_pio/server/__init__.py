"""The OpenAI-compatible server: `build_app(engine_client, model_name=...)` for any
`EngineClient`, `LLMEngineClient(llm)` to serve an `LLM`, and `run_server(llm)` (`pio serve`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_pio.engine.async_engine import AsyncLLMEngine
from inference_pio.server.api_server import DEFAULT_MAX_BODY_BYTES, build_app
from inference_pio.server.metrics import EngineStats
from inference_pio.server.protocol import EngineClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from inference_pio.engine.outputs import RequestOutput
    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams

__all__ = ["DEFAULT_MAX_BODY_BYTES", "EngineClient", "EngineStats", "LLMEngineClient",
           "build_app", "default_model_name", "run_server"]


class LLMEngineClient:
    """An `LLM` behind `AsyncLLMEngine` (its step loop starts with the first request).

    `max_model_len` is the LLM's, capped by what the KV cache holds (without a sliding
    window): a longer request could never be scheduled, so defaults stop there."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = AsyncLLMEngine(llm.engine)
        self.tokenizer = llm.tokenizer
        scheduler = llm.engine.scheduler
        capacity = scheduler.block_manager.num_blocks * scheduler.config.block_size
        windowed = scheduler.config.sliding_window is not None
        self.max_model_len = llm.max_model_len if windowed else min(llm.max_model_len, capacity)

    def generate(self, prompt: list[int], params: SamplingParams, request_id: str
                 ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(prompt, params, request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return self.llm.default_sampling_params(**overrides)

    def stats(self) -> EngineStats:
        # Plain reads of ints and lengths: a scrape may see a step half-applied, never a crash.
        scheduler = self.llm.engine.scheduler
        prefix = scheduler.prefix_cache_stats
        return EngineStats(
            num_requests_running=len(scheduler.running),
            num_requests_waiting=len(scheduler.waiting),
            num_used_blocks=scheduler.num_used_blocks,
            num_total_blocks=scheduler.block_manager.num_blocks,
            prefix_cache_queried_tokens=prefix.num_queried_tokens,
            prefix_cache_hit_tokens=prefix.num_hit_tokens)

    def shutdown(self) -> None:
        self.engine.shutdown()


def default_model_name(model_dir: str | Path) -> str:
    """"org/name" for a Hugging Face cache snapshot (models--org--name/snapshots/REV), else the
    directory's name."""
    path = Path(model_dir)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


def weight_bytes(llm: LLM) -> int:
    """Bytes of the model's tensors (parameters and buffers, e.g. quantized weights)."""
    tensors = [*llm.model.parameters(), *llm.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_server(llm: LLM, *, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, served_model_name: str | None = None,
               log_level: str = "info") -> None:
    """Serve `llm` over HTTP until interrupted (loopback only unless `host` says otherwise)."""
    import uvicorn

    from inference_pio.utils.memory import format_bytes

    name = served_model_name or default_model_name(llm.model_dir)
    app = build_app(LLMEngineClient(llm), model_name=name, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    # uvicorn.Config configured uvicorn's loggers: log there so the lines show with its own.
    log = logging.getLogger("uvicorn.error")
    log.info("serving %r at http://%s:%d/v1 (API key %s)", name, host, port,
             "required" if api_key else "off")
    log.info("%s", llm.kv_cache_plan.describe())
    log.info("weights: %s", format_bytes(weight_bytes(llm)))
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it",
                    host)
    uvicorn.Server(config).run()

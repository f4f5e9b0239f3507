"""`run_server(llm, config)` (`pio serve`): an `LLM` behind `AsyncLLMEngine` (`LLMEngineClient`)
served by uvicorn, with the names the server answers to."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from inference_pio.engine.async_engine import AsyncLLMEngine
from inference_pio.server.api_server import build_app
from inference_pio.server.config import ServerConfig
from inference_pio.server.metrics import EngineStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from inference_pio.engine.outputs import RequestOutput
    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams

def _load_native_kernels() -> None:
    from inference_pio.kernels import cpu

    cpu.available()  # builds or loads them; False (logged) means the plain-torch path


class LLMEngineClient:
    """An `LLM` behind `AsyncLLMEngine`.

    `max_model_len` is the LLM's, capped by what the KV cache holds (without a sliding
    window): a longer request could never be scheduled, so defaults stop there. With
    `warmup=True` the engine thread starts now and first builds or loads the native CPU
    kernels; `ready` is False until that is done (requests wait in the engine's queue)."""

    def __init__(self, llm: LLM, *, warmup: bool = False) -> None:
        self.llm = llm
        on_cpu = getattr(llm, "device", None) is None or llm.device.type == "cpu"
        self._warmup = warmup
        self.engine = AsyncLLMEngine(llm.engine,
                                     warmup=_load_native_kernels if warmup and on_cpu else None)
        self.tokenizer = llm.tokenizer
        scheduler = llm.engine.scheduler
        self.max_num_seqs = scheduler.config.max_num_seqs
        capacity = scheduler.block_manager.num_blocks * scheduler.config.block_size
        windowed = scheduler.config.sliding_window is not None
        self.max_model_len = llm.max_model_len if windowed else min(llm.max_model_len, capacity)
        if warmup:
            self.engine.start()

    @property
    def ready(self) -> bool:
        return not self._warmup or self.engine.ready.is_set()

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
            num_requests_waiting=len(scheduler.waiting) + self.engine.num_pending,
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


def served_names(served_model_name: Sequence[str], model_arg: str | None,
                 model_dir: str | Path | None) -> tuple[str, ...]:
    """Every name the server answers to, the first one reported in responses: the
    --served-model-name list, then --model as given (and without a trailing slash), then the
    directory's name (or "org/name" for a hub snapshot)."""
    names: list[str] = [*served_model_name]
    if model_arg:
        names += [model_arg, model_arg.rstrip("/")]
    if model_dir is not None:
        names += [default_model_name(model_dir), Path(model_dir).name]
    unique = tuple(dict.fromkeys(n for n in names if n))
    return unique or ("default",)


def weight_bytes(llm: LLM) -> int:
    """Bytes of the model's tensors (parameters and buffers, e.g. quantized weights)."""
    tensors = [*llm.model.parameters(), *llm.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_server(llm: LLM, config: ServerConfig | None = None, *, model_arg: str | None = None,
               **settings: Any) -> None:
    """Serve `llm` over HTTP until SIGINT/SIGTERM, then return (exit status 0 for the CLI).
    `settings` are ServerConfig fields overriding `config` (loopback-only by default)."""
    import dataclasses

    from inference_pio.server.limits import TimedH11Protocol
    from inference_pio.utils.memory import format_bytes

    if isinstance(settings.get("served_model_name"), str):
        settings["served_model_name"] = (settings["served_model_name"],)
    config = dataclasses.replace(config or ServerConfig(), **settings)
    names = served_names(config.served_model_name, model_arg, llm.model_dir)
    client = LLMEngineClient(llm, warmup=True)
    app = build_app(client, model_name=names, config=config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        http=TimedH11Protocol.factory(config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_timeout_s,
        limit_concurrency=config.max_connections, timeout_graceful_shutdown=5)
    # uvicorn.Config configured uvicorn's loggers: log there so the lines show with its own.
    log = logging.getLogger("uvicorn.error")
    log.info("serving %s at http://%s:%d/v1 (API key %s)", ", ".join(map(repr, names)),
             config.host, config.port, "required" if config.api_key else "off")
    log.info("%s", llm.kv_cache_plan.describe())
    log.info("weights: %s", format_bytes(weight_bytes(llm)))
    if config.api_key is None and not config.bind_is_loopback():
        log.warning("listening on %s without an API key: anyone who can reach it can use it",
                    config.host)
    _QuietExitServer(uv_config).run()


class _QuietExitServer(uvicorn.Server):
    """uvicorn.Server that does not re-raise the SIGINT/SIGTERM it shut down on: the caller
    returns normally (so `pio serve` exits 0 after a clean shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

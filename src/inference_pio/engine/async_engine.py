"""AsyncLLMEngine: the engine's step loop on a background thread, with one asyncio queue per
request, for servers. A consumer that stops iterating (client gone) aborts its request."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from inference_pio.engine.llm_engine import LLMEngine
from inference_pio.engine.outputs import RequestOutput
from inference_pio.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = RequestOutput | BaseException


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # the engine is not thread-safe: every call holds this
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._thread: threading.Thread | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="pio-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (each with `delta_text` / `delta_token_ids`); the last
        one has `finished=True`. Bad requests raise before the first output."""
        self.start()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early: free the request's KV now
                self.abort(request_id)
            self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            out = self.engine.abort_request(request_id)
        target = self._queues.get(request_id)
        if out is not None and target is not None:
            target[0].call_soon_threadsafe(target[1].put_nowait, out)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                try:
                    outputs = self.engine.step() if busy else []
                except Exception as e:  # a failed step fails every request, never the thread
                    logger.exception("engine step failed")
                    self._fail_all(e)
                    continue
            if not busy:
                self._wakeup.wait(self.idle_wait_s)
                self._wakeup.clear()
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: _Item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            target[0].call_soon_threadsafe(target[1].put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        """Called with the lock held: abort everything and hand each consumer the error."""
        for request_id in list(self.engine.scheduler.requests):
            self.engine.abort_request(request_id)
        for request_id in list(self._queues):
            self._deliver(request_id, RuntimeError(f"engine step failed: {error!r}"))

"""AsyncLLMEngine: the engine's step loop on a background thread, with one asyncio queue per
request, for servers. A consumer that stops iterating (client gone) aborts its request.

The event loop never waits for the engine: `generate` and `abort` only put a command on the
engine thread's input queue (a plain deque, no lock shared with a step), and the engine thread
applies the commands between steps. A request the engine refuses (`add_request` raises) gets
the error as its first item. A request the engine fails inside a step comes back as a finished
output with finish_reason "error" (the engine isolates it; the others go on); a step that
raises anyway fails the requests in flight, never the thread. `warmup`, run first on the engine thread, is where the server builds or loads the
native kernels; `ready` is set once it returns."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable

from inference_pio.engine.llm_engine import LLMEngine
from inference_pio.engine.outputs import RequestOutput
from inference_pio.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Item = RequestOutput | BaseException
_Target = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[_Item]"]


class EngineFailedError(RuntimeError):
    """The engine could not run a request; the message is safe to show to a client (the
    cause is logged server-side with the request id)."""

    def __init__(self, request_id: str, message: str = "the engine failed to run this request"
                 ) -> None:
        super().__init__(message)
        self.request_id = request_id


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05,
                 warmup: Callable[[], object] | None = None) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.warmup = warmup
        self.ready = threading.Event()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        # ("add", id, prompt, params, target) | ("abort", id): applied by the engine thread only.
        self._commands: collections.deque[tuple[object, ...]] = collections.deque()
        self._queues: dict[str, _Target] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Held by the engine thread while it applies commands and steps; never taken on an
        # event loop. Observers on other threads (benchmarks) take it for a consistent view.
        self._lock = threading.Lock()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        """Commands not yet applied by the engine thread (a snapshot)."""
        return len(self._commands)

    def start(self) -> None:
        with self._start_lock:
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
        one has `finished=True`. Bad requests raise (RequestError) before the first output; a
        request the engine fails raises EngineFailedError."""
        self.start()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._commands.append(("add", request_id, prompt, params))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early: free the request's KV now
                self.abort(request_id)
            self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort `request_id` (idempotent; returns at once)."""
        self._commands.append(("abort", request_id))
        self._wakeup.set()

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        if self.warmup is not None:
            try:
                self.warmup()
            except Exception:
                logger.exception("engine warm-up failed")
        self.ready.set()
        while not self._stopping.is_set():
            with self._lock:
                self._apply_commands()
                busy = self.engine.has_unfinished_requests()
                outputs = self._step() if busy else []
            if not busy:
                self._wakeup.wait(self.idle_wait_s)
                self._wakeup.clear()
            for out in outputs:
                self._deliver(out.request_id, out)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception:
            logger.exception("engine step failed; failing the requests in flight: %s",
                             ", ".join(self.engine.scheduler.requests))
            for request_id in list(self.engine.scheduler.requests):
                self._fail(request_id)
        return []

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            request_id = str(command[1])
            if command[0] == "abort":
                out = self.engine.abort_request(request_id)
                if out is not None:
                    self._deliver(request_id, out)
                continue
            _, _, prompt, params = command
            if request_id not in self._queues:  # its consumer already left
                continue
            try:
                self.engine.add_request(request_id, prompt, params)  # type: ignore[arg-type]
            except ValueError as e:  # RequestError and SamplingParams' checks: the client's
                self._deliver(request_id, e)
            except Exception:
                logger.exception("request %s could not be added", request_id)
                self._deliver(request_id, EngineFailedError(request_id))

    def _fail(self, request_id: str) -> None:
        """Abort `request_id` and hand its consumer an EngineFailedError (no internal text)."""
        self.engine.abort_request(request_id)
        self._deliver(request_id, EngineFailedError(request_id))

    def _deliver(self, request_id: str, item: _Item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            try:
                target[0].call_soon_threadsafe(target[1].put_nowait, item)
            except RuntimeError:  # its event loop is closed: nobody is listening
                pass

"""Async bridge between the FastAPI event loop and the engine's own thread.

The engine is not thread-safe and its step() holds the CPU/GPU for milliseconds to seconds, so it
lives in one daemon thread that owns it completely: the event loop only puts commands (add, abort)
on a thread-safe queue, and the thread hands every RequestOutput back with
`loop.call_soon_threadsafe` into the owning request group's asyncio.Queue.

Backpressure: `submit()` refuses (QueueFullError -> 429) when the engine's waiting requests plus
the adds not yet handed to it reach `max_queue`. max_queue is read from the engine's
`config.scheduler.max_queue` once it is built, unless given to the constructor.

Logs: the engine thread feeds a RequestLogger (one line per finished request) and an
EngineStatsLogger (a periodic engine line); see server/logs.py.

Failure: if step() raises, every request the engine holds gets a final ERROR output (an accepted
request is never left hanging), the engine is told to abort them, and the thread keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable

from engine.types import EngineRequest, FinishReason, RequestOutput
from server.logs import EngineStatsLogger, RequestLogger

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class QueueFullError(RuntimeError):
    """Raised by submit() when the waiting queue is full (mapped to 429; same name as the engine's)."""


class EngineNotReadyError(RuntimeError):
    """Raised by submit() while the model loads or the server drains (mapped to 503)."""


class RequestGroup:
    """The outputs of a set of engine requests that answer one HTTP call, merged in arrival order.

    Iterating yields RequestOutput deltas of any member until every member finished. Leaving the
    `async with` block (normally, by exception or by cancellation on disconnect) aborts whatever
    is still unfinished, so the engine frees its blocks.
    """

    def __init__(self, client: "EngineClient", request_ids: list[str]):
        self._client = client
        self.request_ids = list(request_ids)
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    def abort(self) -> None:
        for request_id in list(self.unfinished):
            self._client.abort(request_id)
        self.unfinished.clear()

    def end_with_abort(self, message: str) -> None:
        """Abort every unfinished member and wake the consumer with a final ABORT output for each."""
        for request_id in list(self.unfinished):
            self._client.abort(request_id)
            self.queue.put_nowait(RequestOutput(request_id, [], "", 0, 0, finish_reason=FinishReason.ABORT,
                                                error=message))

    async def __aenter__(self) -> "RequestGroup":
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()
        self._client._forget(self.request_ids)


class EngineClient:
    def __init__(self, engine_factory: Callable[[], Any], exporter: Any = None,
                 max_queue: int | None = None, on_load_error: Callable[[BaseException], None] | None = None,
                 request_logger: RequestLogger | None = None, stats_logger: EngineStatsLogger | None = None):
        self._factory = engine_factory
        self.exporter = exporter
        self.request_logger = request_logger or RequestLogger()
        self.stats_logger = stats_logger or EngineStatsLogger()
        self._max_queue = max_queue
        self._on_load_error = on_load_error
        self.engine: Any = None
        self.load_error: BaseException | None = None
        self._commands: queue.Queue = queue.Queue()
        self._groups: dict[str, RequestGroup] = {}  # request_id -> group; touched on the loop thread only
        self._lock = threading.Lock()
        self._num_pending_adds = 0
        self._num_waiting = 0  # the engine's num_waiting, as of its last command or step
        self._live: set[str] = set()  # ids the engine holds; touched on the engine thread only
        self._num_failed_steps = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._draining = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ properties

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stop.is_set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_queue(self) -> int:
        if self._max_queue is not None:
            return self._max_queue
        config = getattr(self.engine, "config", None)
        return config.scheduler.max_queue if config is not None else 256

    @property
    def num_in_flight(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine thread; it builds the engine first, so call this before serving."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="specd-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.is_set() and self.load_error is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return self._ready.is_set()

    def begin_drain(self) -> None:
        """Refuse new requests from now on (503); safe to call from a signal handler."""
        self._draining = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests (503), let in-flight ones finish (at most `timeout` s), stop the thread."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        while self._groups and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for group in set(self._groups.values()):
            group.end_with_abort("the server is shutting down")
        if self._groups:
            await asyncio.sleep(0.1)  # let the engine thread hand the aborts to the engine
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    # ------------------------------------------------------------ loop-thread API

    def submit(self, requests: list[EngineRequest]) -> RequestGroup:
        """Queue requests atomically (all or none); raise QueueFullError / EngineNotReadyError now."""
        if self._draining or not self.ready:
            raise EngineNotReadyError("the server is shutting down" if self._draining else "the model is loading")
        with self._lock:
            if self._num_waiting + self._num_pending_adds + len(requests) > self.max_queue:
                raise QueueFullError(f"waiting queue is full ({self.max_queue} requests)")
            self._num_pending_adds += len(requests)
        group = RequestGroup(self, [r.request_id for r in requests])
        for r in requests:
            self._groups[r.request_id] = group
            self._commands.put(("add", r))
        return group

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request until it finishes; closing the generator early aborts it."""
        async with self.submit([request]) as group:
            async for out in group:
                yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._groups.pop(request_id, None)

    def _deliver(self, item: RequestOutput | BaseException, request_id: str) -> None:
        group = self._groups.get(request_id)
        if group is not None:  # None: the consumer left; the engine was already told to abort
            group.queue.put_nowait(item)

    # ------------------------------------------------------------ engine thread

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._deliver, item, request_id)

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - reported via /health and the callback
            log.exception("engine failed to load")
            self.load_error = exc
            if self._on_load_error is not None:
                self._loop.call_soon_threadsafe(self._on_load_error, exc)
            return
        self._ready.set()
        log.info("engine ready: %s (max_model_len %d)", self.model_name, self.max_model_len)
        while not self._stop.is_set():
            self._drain_commands(block=not self.engine.has_unfinished_requests())
            if self.engine.has_unfinished_requests():
                self._step()
            self.stats_logger.maybe_log()

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: tuple) -> None:
        kind, arg = cmd
        if kind == "add":
            try:
                self.engine.add_request(arg)
                self._live.add(arg.request_id)
                config = getattr(self.engine, "config", None)
                self.request_logger.on_add(arg, getattr(config, "spec", None) or "none")
            except Exception as exc:  # noqa: BLE001 - QueueFullError or a bad request: tell its owner
                self._send(arg.request_id, exc)
            finally:
                with self._lock:
                    self._num_pending_adds -= 1
                    self._num_waiting = self.engine.num_waiting
        elif kind == "abort" and arg in self._live:
            self.engine.abort_request(arg)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one bad step must not take the server down
            log.exception("engine step failed; failing its requests")
            self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
            self._num_failed_steps += 1
            # A persistently broken engine would otherwise spin on step() and flood the log.
            time.sleep(min(1.0, 0.001 * 2 ** self._num_failed_steps))
            return
        self._num_failed_steps = 0
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
            self.request_logger.on_output(out)
            self._send(out.request_id, out)
        with self._lock:
            self._num_waiting = self.engine.num_waiting
        self._observe()

    def _observe(self) -> None:
        stats = getattr(self.engine, "last_stats", None)
        if stats is None:
            return
        try:
            if self.exporter is not None:
                self.exporter.observe_step(stats)
            self.stats_logger.observe(stats)
        except Exception:  # noqa: BLE001 - metrics never break serving
            log.exception("observing step stats failed")

    def _fail_all(self, message: str) -> None:
        for request_id in sorted(self._live):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001
                log.exception("abort of %s after a failed step also failed", request_id)
            out = RequestOutput(request_id=request_id, new_token_ids=[], new_text="", num_prompt_tokens=0,
                                num_output_tokens=0, finish_reason=FinishReason.ERROR, error=message)
            self.request_logger.on_output(out)
            self._send(request_id, out)
        self._live.clear()
        self._drop_engine_outputs()

    def _drop_engine_outputs(self) -> None:
        # abort_request queues ABORT outputs for the next step; the requests already got their
        # ERROR output, so run that step now and discard them (a failure here is only logged).
        try:
            if self.engine.has_unfinished_requests():
                self.engine.step()
                self._observe()  # the aborts still count in the finished-by-reason metrics
        except Exception:  # noqa: BLE001
            log.exception("cleanup step after a failed step also failed")

"""Drives an `Engine` from one background thread for asyncio servers.

The engine is touched only by its thread: new requests and aborts are handed over through
thread-safe queues and applied between steps, so the event loop never waits for a forward pass.
Outputs travel back to each request's asyncio queue with `call_soon_threadsafe`.

The engine thread must be the only thread with OpenMP workers: prepare the engine (load the model)
with `in_passing_thread`, never on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

from ..errors import Mistral7BError
from .engine import Engine, QueueFull
from .request import Request, SequenceOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() run in a thread that ends when it returns (its exception raised here).

    Why: libgomp keeps a pool of OpenMP worker threads for every thread that ever ran a parallel
    region, until that thread ends, and once the pools hold more threads than there are cores its
    barriers stop spinning and sleep. A model loaded on the main thread (parallel torch ops) left
    such a pool behind, and the engine thread's decode step, ~6 barriers a layer, ran at half
    speed (65 instead of 125 steps/s on 2 cores). Loaded here, the pool goes with the thread."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="mistral7b-prepare", daemon=True)  # daemon: Ctrl-C need not wait
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future  # done once the engine thread has queued the request (or found no room)
    last_token_at: dict[int, float] = field(default_factory=dict)  # per choice index


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():  # its waiter may have given up
        future.set_result(None) if error is None else future.set_exception(error)


class EngineFailure(RuntimeError):
    """The engine raised while stepping or sampling a sequence (a bug, not a client's mistake): the
    request cannot finish."""


class ShuttingDown(Mistral7BError):
    """The server is stopping: no new requests, and those still running at the drain's deadline end."""


class ThreadedEngine:
    def __init__(self, engine: Engine, *, on_step: Callable[[Engine], None] | None = None,
                 on_token: Callable[[str, float], None] | None = None):
        """on_step(engine) runs after every step (gauges); on_token(kind, seconds) reports
        "ttft" / "itl" latencies (histograms)."""
        self.engine = engine
        self.on_step, self.on_token = on_step, on_token
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._listeners: dict[str, _Listener] = {}
        self._wake = threading.Event()
        self._stop = False
        self._drain_deadline: float | None = None  # time.monotonic() at which running requests are stopped
        self._thread = threading.Thread(target=self._run, name="mistral7b-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def drain(self, timeout: float) -> None:
        """Refuse new requests from now on and stop those still running in `timeout` seconds: their
        streams end with ShuttingDown (safe to call from a signal handler)."""
        self._drain_deadline = time.monotonic() + timeout
        self._wake.set()

    async def submit(self, requests: list[Request]) -> list[AsyncIterator[SequenceOutput]]:
        """Validate the requests (InputError -> the caller's 400) and queue them all in the engine,
        or none (QueueFull -> 503): this returns once the engine thread has taken them, so a caller
        can still answer with a status of its choice. -> one output stream per request; leaving one
        early (client gone) aborts its request."""
        if self._drain_deadline is not None:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        if any(r.params.constraint is not None for r in requests):  # compiling a grammar: off the event loop
            await asyncio.to_thread(self._validate, requests)
        else:
            self._validate(requests)
        waiting = self.engine.num_waiting + self._incoming.qsize()
        if waiting + len(requests) > self.engine.max_queue:
            raise QueueFull(f"the server is overloaded ({waiting} requests waiting); retry later")
        listeners = [self._hand_over(request) for request in requests]
        try:
            await asyncio.gather(*(listener.accepted for listener in listeners))
        except (QueueFull, asyncio.CancelledError):  # others took the last places since the count above
            for request in requests:
                self._abandon(request.request_id)
            raise
        return [self._outputs(request, listener) for request, listener in zip(requests, listeners)]

    def _validate(self, requests: list[Request]) -> None:
        for request in requests:
            self.engine.validate(request)

    def release(self, requests: list[Request]) -> None:
        """Abort whichever of these requests still runs. For a caller whose streams may never have
        been read: a stream never started has no `finally` to abort its request."""
        for request in requests:
            if request.request_id in self._listeners:
                self._abandon(request.request_id)

    def _hand_over(self, request: Request) -> _Listener:
        loop = asyncio.get_running_loop()
        listener = _Listener(loop, asyncio.Queue(), loop.create_future())
        self._listeners[request.request_id] = listener
        self._incoming.put(request)
        self._wake.set()
        return listener

    def _abandon(self, request_id: str) -> None:
        self._listeners.pop(request_id, None)
        self._aborts.put(request_id)
        self._wake.set()

    async def _outputs(self, request: Request, listener: _Listener) -> AsyncIterator[SequenceOutput]:
        remaining = request.params.n
        try:
            while remaining:
                out = await listener.queue.get()
                if isinstance(out, Exception):
                    raise out
                if out.error is not None:  # this sequence failed alone; the rest of the request is aborted
                    raise EngineFailure(out.error)
                if out.finish_reason is not None:
                    remaining -= 1
                yield out
        finally:
            if remaining:
                self._abandon(request.request_id)
            else:
                self._listeners.pop(request.request_id, None)

    def _apply_handovers(self) -> None:
        while not self._incoming.empty():
            request = self._incoming.get()
            listener = self._listeners.get(request.request_id)
            if listener is None:  # already abandoned
                continue
            try:
                self.engine.enqueue(request)  # validated by submit()
            except QueueFull as e:  # others filled the queue since submit() looked
                self._listeners.pop(request.request_id, None)
                listener.loop.call_soon_threadsafe(_settle, listener.accepted, e)
            else:
                listener.loop.call_soon_threadsafe(_settle, listener.accepted, None)
        while not self._aborts.empty():
            self.engine.abort(self._aborts.get())

    def _run(self) -> None:
        while not self._stop:
            self._apply_handovers()
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._fail_all(ShuttingDown("the server shut down before this request finished"))
            if not self.engine.has_work:
                if self.on_step:
                    self.on_step(self.engine)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug: fail the running requests loudly instead of hanging them
                log.exception("engine step failed")
                self._fail_all(EngineFailure(str(e)))
                continue
            now = time.monotonic()
            for out in outputs:
                listener = self._listeners.get(out.request_id)
                if listener is None:
                    continue
                self._time_token(out, listener, now)
                listener.loop.call_soon_threadsafe(listener.queue.put_nowait, out)
            if self.on_step:
                self.on_step(self.engine)

    def _fail_all(self, error: Exception) -> None:
        """End every request with `error` in its stream (the engine thread only)."""
        for request_id, listener in list(self._listeners.items()):
            listener.loop.call_soon_threadsafe(listener.queue.put_nowait, error)
            self.engine.abort(request_id)

    def _time_token(self, out: SequenceOutput, listener: _Listener, now: float) -> None:
        if self.on_token is None or not out.new_tokens:
            return
        previous = listener.last_token_at.get(out.index)
        if previous is None:
            self.on_token("ttft", now - out.arrival)
        else:
            self.on_token("itl", now - previous)
        listener.last_token_at[out.index] = now

"""The async side of requests: events handed from the engine thread to asyncio, and iterated.

Owns: `LoopBridge`, the one way events cross from the engine thread (or the thread that reads
an engine process's reports) to an event loop (batched: a step's tokens wake the loop once, not
once per token; a closed loop cancels the requests whose events it can no longer take), the
`LoopBridges` that keep one per loop, and `RequestStream`, an iterator of one request's `TokenEvent`s
that cancels the request when the consumer stops early (a client disconnect), so its KV blocks
and slot are freed. It must not run engine work or touch the engine's state.
"""

import asyncio
import threading
import weakref
from collections.abc import Callable

from loraplex.engine.request import TokenEvent

Sink = Callable[[TokenEvent], None]


class LoopBridge:
    """Delivers events from the engine thread to callbacks run on one asyncio loop, in bursts.

    The first event after the loop last drained schedules one drain; events that arrive before
    it runs join it. Deliveries keep their arrival order.

    Args:
        loop: the loop the deliveries run on.
        on_lost: called with a request id when its events cannot reach a closed loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[str], None]):
        self._loop = loop
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._pending: list[tuple[Sink, TokenEvent]] = []
        self._scheduled = False

    def sink(self, deliver: Sink) -> Sink:
        """A sink for the engine: each event it takes is given to `deliver` on the loop."""
        return lambda event: self._push(deliver, event)

    def _push(self, deliver: Sink, event: TokenEvent) -> None:
        with self._lock:
            self._pending.append((deliver, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for _, lost in self._take():
                self._on_lost(lost.request_id)

    def _take(self) -> list[tuple[Sink, TokenEvent]]:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        return pending

    def _drain(self) -> None:
        for deliver, event in self._take():
            deliver(event)


class LoopBridges:
    """One `LoopBridge` per event loop that submits requests, made on first use, gone with the loop.

    Args:
        on_lost: given to each bridge: called with a request id whose events reach no loop.
    """

    def __init__(self, on_lost: Callable[[str], None]):
        self._on_lost = on_lost
        self._bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def for_running_loop(self) -> LoopBridge:
        """The bridge to the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if loop not in self._bridges:
                self._bridges[loop] = LoopBridge(loop, self._on_lost)
            return self._bridges[loop]


class RequestStream:
    """`async for event in stream` until the event carrying `finish_reason`."""

    def __init__(self, request_id: str, events: asyncio.Queue, cancel: Callable[[str], None]):
        self.request_id = request_id
        self._events = events
        self._cancel = cancel
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self.finished:
            raise StopAsyncIteration
        try:
            event = await self._events.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if event.finish_reason is not None:
            self.finished = True
        return event

    def cancel(self) -> None:
        """Abort the request if it is still running; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()

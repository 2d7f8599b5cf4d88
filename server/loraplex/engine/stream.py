"""The async side of one request: an iterator of its `TokenEvent`s that cancels when dropped.

Owns: handing events from the engine thread to an asyncio consumer, and cancelling the request
when the consumer stops early (a client disconnect), so its KV blocks and slot are freed.
"""

import asyncio
from collections.abc import Callable

from loraplex.engine.request import TokenEvent


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

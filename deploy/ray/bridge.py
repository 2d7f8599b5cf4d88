"""One HTTP request through an ASGI app in the same process, its response as a stream of parts.

Owns: `call_asgi`, which lets a Ray replica answer a request with loraplex's own FastAPI app
(routes, error shapes, SSE streaming) without a socket: the first part is the response head
`{"status", "headers"}`, the rest are body chunks as the app sends them. Closing the stream early
tells the app the client went away, so a streaming request is cancelled in the engine.
It knows nothing of Ray or of loraplex.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class HttpCall:
    """The parts of an HTTP request a replica needs; plain data, so it pickles across Ray."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def _scope(call: HttpCall) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query_string,
        "root_path": "",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in call.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }


async def call_asgi(app, call: HttpCall) -> AsyncIterator[dict | bytes]:
    """Run `call` through `app`; yields the head dict, then body chunks (bytes)."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(call), receive, messages.put)
        except Exception:  # the app has answered 500 already; the traceback is for the logs
            log.exception("request %s %s failed", call.method, call.path)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in message.get("headers", [])]
                yield {"status": message["status"], "headers": headers}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()

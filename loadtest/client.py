"""One streamed completion against any OpenAI-compatible server, timed chunk by chunk.

Owns: the request body the load generator sends (`/v1/completions`, greedy, streamed, with
`stream_options.include_usage`), reading the server-sent events, and turning what arrived into a
`RequestRecord`. Times come from the caller's clock so that every record of a run shares one
origin. It must not decide when to send (driver.py does) or compute statistics.
"""

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from loadtest.records import OK, RequestRecord
from loadtest.trace import RequestSpec

CANCELLED = "cancelled"  # status of a request cut short by the run's time bound


@dataclass(frozen=True)
class ClientConfig:
    """What every request of a run shares.

    Args:
        base_url: the server's root, e.g. `http://127.0.0.1:8000` (`/v1/completions` is appended).
        api_key: sent as a bearer token when set.
        ignore_eos: ask for exactly `max_tokens` tokens (vLLM's extension, which loraplex accepts).
        timeout: seconds a request may take before it is recorded as an error.
    """

    base_url: str
    api_key: str | None = None
    ignore_eos: bool = True
    timeout: float = 300.0


def completion_body(spec: RequestSpec, ignore_eos: bool) -> dict:
    body = {
        "model": spec.model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, or the body itself."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]


class _Stream:
    """Accumulates one response's events into a record."""

    def __init__(self, record: RequestRecord, clock_start: float):
        self.record = record
        self.sent_at = clock_start + record.sent  # absolute monotonic time of the send
        self.last_chunk: float | None = None
        self.chunks = 0
        self.usage: dict | None = None
        self.done = False

    def event(self, data: str) -> None:
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            raise ValueError(f"error event: {event['error']}")
        if event.get("usage"):
            self.usage = event["usage"]
        choices = event.get("choices") or []
        if not any(choice.get("text") for choice in choices):
            return
        now = time.monotonic()
        if self.last_chunk is None:
            self.record.ttft = now - self.sent_at
        else:
            self.record.itl.append(now - self.last_chunk)
        self.last_chunk = now
        self.chunks += 1

    def finish(self) -> None:
        record = self.record
        record.latency = time.monotonic() - self.sent_at
        record.output_tokens = self.usage["completion_tokens"] if self.usage else self.chunks
        if self.usage:
            record.prompt_tokens = self.usage["prompt_tokens"]
        if not self.done:
            record.status, record.error = "error", "the stream ended without [DONE]"


async def send(
    client: httpx.AsyncClient, config: ClientConfig, spec: RequestSpec, clock_start: float, sent: float, scheduled: float
) -> RequestRecord:
    """Send `spec` as a streamed completion and record how it went; never raises for server faults.

    Cancelling the task running it ends the request and returns its record marked `cancelled`.

    Args:
        client: a shared async HTTP client.
        config: the run's client settings.
        spec: the request to send.
        clock_start: the run's origin on `time.monotonic()`.
        sent: offset at which the caller sends it, on the clock reading it checked the time bound with.
        scheduled: offset at which the request was due.
    """
    record = RequestRecord(
        index=spec.index,
        adapter=spec.model,
        scheduled=scheduled,
        sent=sent,
        prompt_tokens=spec.prompt_tokens,
        max_tokens=spec.max_tokens,
    )
    stream = _Stream(record, clock_start)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    url = config.base_url.rstrip("/") + "/v1/completions"
    try:
        async with client.stream(
            "POST", url, json=completion_body(spec, config.ignore_eos), headers=headers, timeout=config.timeout
        ) as response:
            if response.status_code != 200:
                record.status, record.error = f"http_{response.status_code}", error_message(await response.aread())
                record.latency = time.monotonic() - stream.sent_at
                return record
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    stream.event(line[len("data:") :].strip())
        stream.finish()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:  # the driver cancels requests still running at the time bound
        record.status, record.error = CANCELLED, "cut short by the run's time bound"
        return record
    if record.status == OK and record.ttft is None and record.output_tokens > 0:
        record.status, record.error = "error", "usage reports tokens but no text arrived"
    return record

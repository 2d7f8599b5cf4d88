"""The driver's time bound, against an in-process HTTP stub: no request goes out at or after it.

The stub blocks the event loop while it answers, so a request that was due before the bound
starts after it: the case a loaded machine produces, made here on purpose.
"""

import asyncio
import time

import httpx

from loadtest.client import ClientConfig
from loadtest.driver import _Run, closed_loop, open_loop
from loadtest.trace import RequestSpec

BOUND = 0.2
STREAM = b'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n'


def blocking_stub(request: httpx.Request) -> httpx.Response:
    time.sleep(BOUND * 1.5)  # holds the event loop past the bound, as a starved client process would
    return httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"})


def drive_stub(loop) -> list:
    specs = [RequestSpec(index, arrival=0.0, model="m", prompt=[1, 2], prompt_tokens=2, max_tokens=1) for index in range(3)]

    async def main() -> list:
        run = _Run(ClientConfig("http://stub"), BOUND, on_record=lambda record: None)
        async with httpx.AsyncClient(transport=httpx.MockTransport(blocking_stub)) as client:
            await loop(run, client, specs)
        return run.records

    return asyncio.run(main())


def test_an_open_loop_request_due_before_the_bound_is_not_sent_once_the_bound_has_passed():
    records = drive_stub(open_loop)
    # All three were due at 0; the first one's answer took the loop past the bound before the others started.
    assert [record.index for record in records] in ([], [0])
    assert all(record.sent < BOUND for record in records)


def test_a_closed_loop_client_sends_nothing_once_the_bound_has_passed():
    records = drive_stub(lambda run, client, specs: closed_loop(run, client, specs, concurrency=1))
    assert [record.index for record in records] in ([], [0])
    assert all(record.sent < BOUND for record in records)

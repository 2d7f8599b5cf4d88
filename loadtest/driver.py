"""Drive a trace against a server: open loop (arrivals on a schedule) or closed loop (C clients).

Owns: sending the trace's requests at the right moments, the run's two bounds (the trace's length
and `max_seconds`: requests still running at the time bound are cancelled and recorded as such,
and no new one starts), the progress bar, and the run's duration. It must not build traces or
compute statistics.
"""

import asyncio
import time
from collections.abc import Callable

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.client import ClientConfig, send
from loadtest.records import RequestRecord
from loadtest.trace import RequestSpec

Observer = Callable[[RequestRecord], None]


class _Run:
    """Bookkeeping shared by both loops: the clock, the time bound, the records, the progress bar."""

    def __init__(self, client_config: ClientConfig, max_seconds: float, on_record: Observer):
        self.config = client_config
        self.start = time.monotonic()
        self.max_seconds = max_seconds
        self.deadline = self.start + max_seconds
        self.records: list[RequestRecord] = []
        self.on_record = on_record

    def now(self) -> float:
        return time.monotonic() - self.start

    def expired(self, offset: float | None = None) -> bool:
        """Whether `offset` (now, when None) is at or past the time bound."""
        return (self.now() if offset is None else offset) >= self.max_seconds

    async def one(self, client: httpx.AsyncClient, spec: RequestSpec, scheduled: float | None = None) -> bool:
        """Send `spec` and record it, unless the time bound has passed; whether it was sent.

        The bound is checked here, as the request goes out (a task may start well after it was
        created), on the same clock reading that becomes the record's `sent`: no request is sent at
        or after the bound.

        Args:
            client: the run's HTTP client.
            spec: the request.
            scheduled: offset at which it was due; None means now (closed loop).
        """
        sent = self.now()
        if self.expired(sent):
            return False
        record = await send(client, self.config, spec, self.start, sent, sent if scheduled is None else scheduled)
        self.records.append(record)
        self.on_record(record)
        return True

    def duration(self) -> float:
        """From the first send to the last end (a cancelled request ends at the time bound)."""
        if not self.records:
            return 0.0
        first = min(record.sent for record in self.records)
        last = max(record.finished if record.finished is not None else self.now() for record in self.records)
        return max(last - first, 0.0)


async def _cancel_at_deadline(run: _Run, tasks: set[asyncio.Task]) -> None:
    """Wait for `tasks`, cancelling whatever still runs when the deadline passes."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(run.deadline - time.monotonic(), 0))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


async def open_loop(run: _Run, client: httpx.AsyncClient, specs: list[RequestSpec]) -> None:
    """Send each request at its arrival offset, whether or not earlier ones have finished."""
    tasks: set[asyncio.Task] = set()
    for spec in specs:
        if run.expired(spec.arrival):
            break
        delay = spec.arrival - run.now()
        if delay > 0:
            await asyncio.sleep(delay)
        if run.expired():  # woke at or after the bound
            break
        tasks.add(asyncio.create_task(run.one(client, spec, spec.arrival)))
    await _cancel_at_deadline(run, tasks)


async def closed_loop(run: _Run, client: httpx.AsyncClient, specs: list[RequestSpec], concurrency: int) -> None:
    """`concurrency` clients, each sending its next request as soon as its previous one ends."""
    queue = iter(specs)

    async def worker() -> None:
        for spec in queue:  # the shared iterator hands each spec to exactly one worker
            if not await run.one(client, spec):
                return

    await _cancel_at_deadline(run, {asyncio.create_task(worker()) for _ in range(concurrency)})


def _progress(label: str, total: int, quiet: bool) -> tuple[Progress, Observer]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]} tokens, {task.fields[errors]} errors"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=False,
    )
    task = progress.add_task(label, total=total, tokens=0, errors=0)
    counts = {"tokens": 0, "errors": 0}

    def observe(record: RequestRecord) -> None:
        counts["tokens"] += record.output_tokens
        counts["errors"] += not record.ok
        progress.update(task, advance=1, **counts)

    return progress, observe


def drive(
    specs: list[RequestSpec],
    client_config: ClientConfig,
    max_seconds: float,
    concurrency: int | None = None,
    label: str = "load",
    quiet: bool = False,
) -> tuple[list[RequestRecord], float]:
    """Run the trace to its end or to the time bound, whichever comes first.

    Args:
        specs: the trace; open loop uses each spec's `arrival`.
        client_config: the server and request settings.
        max_seconds: the time bound.
        concurrency: clients of a closed loop; None runs an open loop.
        label: the progress bar's title.
        quiet: hide the progress bar.

    Returns:
        The records, in trace order, and the run's duration in seconds.
    """
    progress, observe = _progress(label, len(specs), quiet)

    async def main() -> _Run:
        run = _Run(client_config, max_seconds, observe)
        connections = concurrency if concurrency is not None else len(specs)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=client_config.timeout) as client:
            if concurrency is None:
                await open_loop(run, client, specs)
            else:
                await closed_loop(run, client, specs, concurrency)
        return run

    with progress:
        run = asyncio.run(main())
    return sorted(run.records, key=lambda record: record.index), run.duration()

"""What one load-test run leaves behind: a record per request and the run's settings, as JSON.

Owns: `RequestRecord` (one request as the client saw it), `RunInfo` (how the run was driven) and
their JSON file. Times are seconds; offsets are from the run's start on the client's monotonic
clock. It must not compute statistics (summary.py does) or send anything.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK = "ok"  # the status of a request that streamed to its end


@dataclass
class RequestRecord:
    """One request, as the client measured it.

    Args:
        index: the request's position in the trace.
        adapter: the `model` the request named (an adapter, or the base model's name).
        scheduled: offset at which the trace wanted the request sent (open loop); the offset it was
            sent at, in closed loop.
        sent: offset at which it was actually sent.
        prompt_tokens: prompt length, from the server's `usage` when it sent one, else the trace's.
        output_tokens: generated tokens, from `usage` when sent, else the number of streamed chunks.
        max_tokens: what the request asked for.
        ttft: seconds from sending to the first generated text; None if none arrived.
        itl: seconds between consecutive streamed chunks after the first, one entry per gap.
        latency: seconds from sending to the end of the stream; None if it never ended.
        status: `ok`, `http_<code>` for an error response, or `error` (transport failure, timeout,
            malformed stream, or cut short by the run's time bound).
        error: what went wrong, for a status other than `ok`.
    """

    index: int
    adapter: str
    scheduled: float
    sent: float
    prompt_tokens: int
    output_tokens: int = 0
    max_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    status: str = OK
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def finished(self) -> float | None:
        """Offset at which the stream ended, or None."""
        return None if self.latency is None else self.sent + self.latency


@dataclass
class RunInfo:
    """How a run was driven, saved next to its records so that a file explains itself.

    Args:
        label: a name for the run (used in summaries and plot titles).
        base_url: the server's OpenAI-compatible base URL.
        mode: `open` (arrivals at a rate) or `closed` (a fixed number of concurrent clients).
        rate: mean arrivals per second (open loop).
        cv: coefficient of variation of inter-arrival gaps; 1 is Poisson (open loop).
        concurrency: concurrent clients (closed loop).
        num_adapters: adapters the trace spreads requests over; 0 means the base model only.
        alpha: power-law exponent of adapter popularity; 0 is uniform.
        max_requests: the run's bound on requests.
        max_seconds: the run's bound on time.
        seed: the trace's random seed.
        duration: seconds from the first send to the last stream's end (or to the time bound).
    """

    label: str
    base_url: str
    mode: str
    rate: float | None = None
    cv: float = 1.0
    concurrency: int | None = None
    num_adapters: int = 0
    alpha: float = 0.0
    max_requests: int = 0
    max_seconds: float = 0.0
    seed: int = 0
    duration: float = 0.0


def save_run(path: Path, info: RunInfo, records: list[RequestRecord]) -> None:
    """Write `{"run": info, "requests": [record, ...]}` to `path`."""
    document = {"run": asdict(info), "requests": [asdict(record) for record in records]}
    path.write_text(json.dumps(document, indent=1))


def load_run(path: Path) -> tuple[RunInfo, list[RequestRecord]]:
    """Read a file written by `save_run`."""
    document = json.loads(path.read_text())
    return RunInfo(**document["run"]), [RequestRecord(**record) for record in document["requests"]]

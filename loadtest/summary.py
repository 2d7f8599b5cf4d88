"""The figures a load-test run is judged by, computed from its records, and their Markdown section.

Owns: `Summary` (counts, duration, throughput, TTFT / ITL / latency percentiles, per-adapter figures
and fairness across adapters), `summarize` which builds it, and `to_markdown` which renders it.
Throughput and every latency figure count `ok` requests only; errors are counted by status.
It must not read files, send requests or draw plots (plots.py does).
"""

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from loadtest.records import RequestRecord, RunInfo

FAIRNESS_MIN_OK = 3  # an adapter needs this many ok requests to count towards fairness
TOP_ADAPTERS = 10  # adapters listed in the Markdown section


@dataclass
class Distribution:
    """Percentiles and mean of a set of durations in seconds; None when the set is empty.

    Args:
        count: how many values there were.
        p50, p90, p99: numpy percentiles (linear interpolation).
        mean: arithmetic mean.
    """

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None


@dataclass
class AdapterStats:
    """One adapter's share of a run.

    Args:
        adapter: the `model` the requests named.
        requests: requests sent to it.
        ok: those that streamed to their end.
        median_ttft: median TTFT of its ok requests, in seconds; None if none had one.
        mean_tokens_per_s: mean over its ok requests of output_tokens / latency; None if none.
    """

    adapter: str
    requests: int
    ok: int
    median_ttft: float | None
    mean_tokens_per_s: float | None


@dataclass
class Fairness:
    """How evenly TTFT was shared across adapters, over those with enough ok requests.

    Args:
        adapters: how many adapters qualified (at least `FAIRNESS_MIN_OK` ok requests with a TTFT).
        min_median_ttft, max_median_ttft: the extremes of their median TTFTs, in seconds.
        ratio: max / min; None when the min is zero.
        cv: coefficient of variation (population std / mean) of their median TTFTs.
    """

    adapters: int
    min_median_ttft: float
    max_median_ttft: float
    ratio: float | None
    cv: float


@dataclass
class Summary:
    """Everything `to_markdown` and the JSON report show about one run.

    Args:
        run: how the run was driven.
        requests: requests sent.
        ok: requests that streamed to their end.
        errors: count of every other status, most frequent first.
        duration: seconds the run lasted.
        prompt_tokens, output_tokens: totals over ok requests.
        requests_per_s, output_tokens_per_s, input_tokens_per_s: ok totals / duration; None
            when the duration is zero.
        ttft, itl, latency: distributions over ok requests (ITL pools every gap of every request).
        adapters: per-adapter figures, most requested first.
        fairness: None when fewer than two adapters qualify.
    """

    run: RunInfo
    requests: int
    ok: int
    errors: dict[str, int]
    duration: float
    prompt_tokens: int
    output_tokens: int
    requests_per_s: float | None
    output_tokens_per_s: float | None
    input_tokens_per_s: float | None
    ttft: Distribution
    itl: Distribution
    latency: Distribution
    adapters: list[AdapterStats] = field(default_factory=list)
    fairness: Fairness | None = None

    def to_dict(self) -> dict:
        """The summary as plain JSON-ready values (seconds, counts, None)."""
        return asdict(self)


def distribution(values: list[float]) -> Distribution:
    """Percentiles and mean of `values`.

    Args:
        values: durations in seconds, in any order.
    """
    if not values:
        return Distribution()
    p50, p90, p99 = (float(p) for p in np.percentile(values, [50, 90, 99]))
    return Distribution(count=len(values), p50=p50, p90=p90, p99=p99, mean=float(np.mean(values)))


def run_duration(info: RunInfo, records: list[RequestRecord]) -> float:
    """`info.duration` when the runner set it, else first send to last stream end (0 with neither).

    Args:
        info: the run's settings.
        records: the run's requests.
    """
    if info.duration > 0:
        return info.duration
    finished = [record.finished for record in records if record.finished is not None]
    if not finished:
        return 0.0
    return max(finished) - min(record.sent for record in records)


def _tokens_per_s(record: RequestRecord) -> float | None:
    """A request's output tokens over its end-to-end latency; None without a positive latency."""
    if record.latency is None or record.latency <= 0:
        return None
    return record.output_tokens / record.latency


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def adapter_stats(records: list[RequestRecord]) -> list[AdapterStats]:
    """Per-adapter figures, most requested first (ties by name).

    Args:
        records: the run's requests.
    """
    by_adapter: dict[str, list[RequestRecord]] = {}
    for record in records:
        by_adapter.setdefault(record.adapter, []).append(record)
    stats = []
    for adapter, group in by_adapter.items():
        ok = [record for record in group if record.ok]
        rates = [rate for rate in map(_tokens_per_s, ok) if rate is not None]
        ttfts = [record.ttft for record in ok if record.ttft is not None]
        stats.append(AdapterStats(adapter, len(group), len(ok), _median(ttfts), _mean(rates)))
    return sorted(stats, key=lambda s: (-s.requests, s.adapter))


def fairness(records: list[RequestRecord]) -> Fairness | None:
    """Spread of per-adapter median TTFT over adapters with at least `FAIRNESS_MIN_OK` ok TTFTs.

    Args:
        records: the run's requests.
    """
    ttfts: dict[str, list[float]] = {}
    for record in records:
        if record.ok and record.ttft is not None:
            ttfts.setdefault(record.adapter, []).append(record.ttft)
    medians = [float(np.median(values)) for values in ttfts.values() if len(values) >= FAIRNESS_MIN_OK]
    if len(medians) < 2:
        return None
    low, high = min(medians), max(medians)
    average = float(np.mean(medians))
    return Fairness(
        adapters=len(medians),
        min_median_ttft=low,
        max_median_ttft=high,
        ratio=high / low if low > 0 else None,
        cv=float(np.std(medians)) / average if average > 0 else 0.0,
    )


def _per_second(total: float, duration: float) -> float | None:
    return total / duration if duration > 0 else None


def summarize(info: RunInfo, records: list[RequestRecord]) -> Summary:
    """The run's summary.

    Args:
        info: how the run was driven.
        records: one record per request sent.
    """
    ok = [record for record in records if record.ok]
    errors = Counter(record.status for record in records if not record.ok)
    duration = run_duration(info, records)
    prompt_tokens = sum(record.prompt_tokens for record in ok)
    output_tokens = sum(record.output_tokens for record in ok)
    return Summary(
        run=info,
        requests=len(records),
        ok=len(ok),
        errors=dict(errors.most_common()),
        duration=duration,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        requests_per_s=_per_second(len(ok), duration),
        output_tokens_per_s=_per_second(output_tokens, duration),
        input_tokens_per_s=_per_second(prompt_tokens, duration),
        ttft=distribution([record.ttft for record in ok if record.ttft is not None]),
        itl=distribution([gap for record in ok for gap in record.itl]),
        latency=distribution([record.latency for record in ok if record.latency is not None]),
        adapters=adapter_stats(records),
        fairness=fairness(records),
    )


def format_number(value: float | None) -> str:
    """About three significant figures: 1,234 / 56.7 / 8.90; a dash for None.

    Args:
        value: the number to show.
    """
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def format_ms(seconds: float | None) -> str:
    """Seconds shown as milliseconds by `format_number`."""
    return format_number(None if seconds is None else seconds * 1000)


def _driving_line(info: RunInfo) -> str:
    """How the run was driven, in one line."""
    if info.mode == "open":
        load = f"open loop at {format_number(info.rate)} req/s (cv {info.cv:g})"
    else:
        load = f"{info.mode} loop with {info.concurrency} concurrent clients"
    adapters = f"{info.num_adapters} adapters (alpha {info.alpha:g})" if info.num_adapters else "base model only"
    bounds = [f"{info.max_requests} requests"] if info.max_requests else []
    bounds += [f"{info.max_seconds:g} s"] if info.max_seconds else []
    return f"{load}, {adapters}, bounds: {', '.join(bounds) or 'none'}, seed {info.seed}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, numeric columns (all but the first) right-aligned."""
    align = ["---"] + ["--:"] * (len(header) - 1)
    return ["| " + " | ".join(cells) + " |" for cells in [header, align, *rows]]


def _fairness_line(fair: Fairness | None) -> str:
    if fair is None:
        return f"Fairness: n/a (fewer than 2 adapters with ≥ {FAIRNESS_MIN_OK} ok requests)."
    return (
        f"Fairness over {fair.adapters} adapters with ≥ {FAIRNESS_MIN_OK} ok requests: median TTFT "
        f"min {format_ms(fair.min_median_ttft)} ms, max {format_ms(fair.max_median_ttft)} ms, "
        f"max/min {format_number(fair.ratio)}, CV {fair.cv:.2f}."
    )


def to_markdown(summary: Summary) -> str:
    """A compact Markdown section for the run: settings, throughput, latency, errors, fairness.

    Args:
        summary: what `summarize` returned.
    """
    errors = ", ".join(f"{status} × {count}" for status, count in summary.errors.items()) or "none"
    throughput = [
        ["ok requests/s", format_number(summary.requests_per_s)],
        ["output tokens/s", format_number(summary.output_tokens_per_s)],
        ["input tokens/s", format_number(summary.input_tokens_per_s)],
    ]
    latency = [
        [name, *(format_ms(value) for value in (dist.p50, dist.p90, dist.p99, dist.mean))]
        for name, dist in (("TTFT", summary.ttft), ("ITL", summary.itl), ("end-to-end", summary.latency))
    ]
    adapters = [
        [f"`{stats.adapter}`", str(stats.requests), str(stats.ok), format_ms(stats.median_ttft)]
        for stats in summary.adapters[:TOP_ADAPTERS]
    ]
    lines = [
        f"### {summary.run.label}",
        "",
        _driving_line(summary.run) + ".",
        f"{summary.requests} requests, {summary.ok} ok, in {summary.duration:.1f} s.",
        "",
        *_table(["throughput", "per second"], throughput),
        "",
        *_table(["latency (ms)", "p50", "p90", "p99", "mean"], latency),
        "",
        f"Errors: {errors}.",
        "",
        _fairness_line(summary.fairness),
    ]
    if adapters:
        lines += ["", *_table(["adapter", "requests", "ok", "median TTFT (ms)"], adapters)]
    return "\n".join(lines) + "\n"

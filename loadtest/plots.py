"""PNG figures of load-test runs and of comparisons between them.

Owns: the four figures of one run (`plot_run`), and three generic charts for reports: bars
(`plot_bars`), named lines (`plot_lines`) and a Prometheus histogram (`plot_histogram`).
Figures are built on `matplotlib.figure.Figure` without pyplot, so nothing here touches the global
backend or keeps figures alive. Any empty input gives a figure that says "no data"; nothing raises
on it. It must not compute summary statistics beyond what a figure draws (summary.py does).
"""

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loadtest.records import OK, RequestRecord, RunInfo
from loadtest.summary import adapter_stats, format_number

MAX_ADAPTER_BARS = 40
MIN_LOG_MS = 1e-3  # non-positive durations are drawn here on log axes


def slug(label: str) -> str:
    """A file-name-safe form of a run label: `loraplex (alpha=1)` -> `loraplex-alpha-1`.

    Args:
        label: the run's label.
    """
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "run"


def _figure(title: str, width: float = 8.0) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    return figure, axes


def _no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=16, transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path


def _ms(seconds: list[float]) -> np.ndarray:
    return np.maximum(np.asarray(seconds, dtype=float) * 1000, MIN_LOG_MS)


def chunk_times(record: RequestRecord) -> np.ndarray:
    """Offsets at which a request's streamed chunks arrived: first at send + TTFT, then by ITL.

    Args:
        record: one request; empty when it has no TTFT.
    """
    if record.ttft is None:
        return np.empty(0)
    return record.sent + record.ttft + np.cumsum([0.0, *record.itl])


def per_second_bins(times: np.ndarray, weights: np.ndarray, seconds: int) -> np.ndarray:
    """Sum of `weights` per 1-second bin of `times`, over `seconds` bins from offset 0.

    Args:
        times: offsets in seconds; negative ones fall in the first bin, late ones in the last.
        weights: one per time.
        seconds: number of bins.
    """
    bins = np.clip(np.floor(times).astype(int), 0, seconds - 1)
    return np.bincount(bins, weights=weights, minlength=seconds)


def _plot_cdfs(axes: Axes, records: list[RequestRecord]) -> None:
    ok = [record for record in records if record.ok]
    samples = {
        "TTFT": [record.ttft for record in ok if record.ttft is not None],
        "ITL": [gap for record in ok for gap in record.itl],
    }
    if not any(samples.values()):
        _no_data(axes)
        return
    for name, values in samples.items():
        if values:
            ms = np.sort(_ms(values))
            axes.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=f"{name} ({len(ms)})")
    axes.set_xscale("log")
    axes.set_xlabel("ms")
    axes.set_ylabel("fraction ≤ x")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()


def token_arrivals(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """When ok requests' chunks arrived and how many output tokens each carried.

    A request's `output_tokens` (from usage) is spread evenly over its chunks.

    Args:
        records: the run's requests; those not ok or with no TTFT are left out.
    """
    times, tokens = [np.empty(0)], [np.empty(0)]
    for record in records:
        arrivals = chunk_times(record)
        if record.ok and len(arrivals):
            times.append(arrivals)
            tokens.append(np.full(len(arrivals), record.output_tokens / len(arrivals)))
    return np.concatenate(times), np.concatenate(tokens)


def _plot_throughput(axes: Axes, records: list[RequestRecord]) -> None:
    finished = np.array([record.finished for record in records if record.ok and record.finished is not None])
    if not len(finished):
        _no_data(axes)
        return
    seconds = math.floor(finished.max()) + 1
    edges = np.arange(seconds + 1)
    times, tokens = token_arrivals(records)
    axes.stairs(per_second_bins(times, tokens, seconds), edges)
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("output tokens/s", color="tab:blue")
    axes.grid(True, alpha=0.3)
    completed = axes.twinx()
    completed.stairs(per_second_bins(finished, np.ones(len(finished)), seconds), edges, color="tab:orange")
    completed.set_ylabel("completed requests/s", color="tab:orange")


def _plot_adapter_ttft(axes: Axes, records: list[RequestRecord]) -> None:
    stats = adapter_stats(records)[:MAX_ADAPTER_BARS]
    if not any(s.median_ttft is not None for s in stats):
        _no_data(axes)
        return
    heights = [np.nan if s.median_ttft is None else s.median_ttft * 1000 for s in stats]
    axes.bar(range(len(stats)), heights)
    axes.set_xticks(range(len(stats)), [s.adapter for s in stats], rotation=90, fontsize=7)
    axes.set_xlabel("adapter, most requested first")
    axes.set_ylabel("median TTFT (ms)")
    axes.grid(True, axis="y", alpha=0.3)


def _plot_latency_scatter(axes: Axes, records: list[RequestRecord]) -> None:
    finished = [record for record in records if record.latency is not None]
    if not finished:
        _no_data(axes)
        return
    statuses = sorted({record.status for record in finished}, key=lambda status: (status != OK, status))
    for status in statuses:
        group = [record for record in finished if record.status == status]
        sent = [record.sent for record in group]
        latency = [record.latency * 1000 for record in group]
        axes.scatter(sent, latency, s=8, alpha=0.6, label=f"{status} ({len(group)})")
    axes.set_xlabel("sent at (s since start)")
    axes.set_ylabel("end-to-end latency (ms)")
    axes.grid(True, alpha=0.3)
    axes.legend()


RUN_FIGURES = (
    ("ttft-itl-cdf", "TTFT and ITL, CDF", _plot_cdfs),
    ("throughput", "output tokens/s and completed requests/s, 1 s bins", _plot_throughput),
    ("adapter-ttft", f"median TTFT per adapter (top {MAX_ADAPTER_BARS} by requests)", _plot_adapter_ttft),
    ("latency-scatter", "end-to-end latency by send time", _plot_latency_scatter),
)


def plot_run(info: RunInfo, records: list[RequestRecord], out_dir: Path) -> list[Path]:
    """Write the run's four figures as `<slug>-<figure>.png` and return their paths.

    The figures: CDFs of TTFT and ITL of ok requests; output tokens/s (usage tokens spread over
    each ok request's chunks) and completed requests/s over time; per-adapter median TTFT;
    end-to-end latency against send time, coloured by status (requests with no latency left out).

    Args:
        info: how the run was driven; its label titles the figures and prefixes the file names.
        records: the run's requests.
        out_dir: where to write them; created if missing.
    """
    paths = []
    for name, title, draw in RUN_FIGURES:
        figure, axes = _figure(f"{info.label}: {title}", width=10.0 if name == "adapter-ttft" else 8.0)
        draw(axes, records)
        paths.append(_save(figure, out_dir / f"{slug(info.label)}-{name}.png"))
    return paths


def plot_bars(title: str, labels: list[str], values: list[float], ylabel: str, path: Path) -> Path:
    """One bar per label, its value written on it (e.g. throughput of several servers).

    Args:
        title: the chart's title.
        labels: one per bar, left to right.
        values: one per label.
        ylabel: the value axis's label, with its unit.
        path: the PNG to write.
    """
    figure, axes = _figure(title)
    if not labels:
        _no_data(axes)
    else:
        bars = axes.bar(range(len(labels)), values, tick_label=labels)
        axes.bar_label(bars, labels=[format_number(value) for value in values], padding=2)
        axes.set_ylabel(ylabel)
        axes.margins(y=0.12)
        axes.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def plot_lines(
    title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]], path: Path, logx: bool = False
) -> Path:
    """Several named lines of (x, y) points (e.g. throughput against adapters, one line per alpha).

    Args:
        title: the chart's title.
        xlabel, ylabel: axis labels, with units.
        series: line name -> its points, in any order (drawn sorted by x).
        path: the PNG to write.
        logx: a logarithmic x axis.
    """
    figure, axes = _figure(title)
    drawn = {name: sorted(points) for name, points in series.items() if points}
    if not drawn:
        _no_data(axes)
    else:
        for name, points in drawn.items():
            x, y = zip(*points, strict=True)
            axes.plot(x, y, marker="o", label=name)
        if logx:
            axes.set_xscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    return _save(figure, path)


def bucket_counts(buckets: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(lower, upper, count) per bucket of a cumulative Prometheus histogram.

    Args:
        buckets: (upper bound `le`, cumulative count) pairs, in any order, `inf` included.
    """
    counts, lower, below = [], -math.inf, 0.0
    for le, cumulative in sorted(buckets):
        counts.append((lower, le, cumulative - below))
        lower, below = le, cumulative
    return counts


def _bucket_label(lower: float, upper: float, scale: float) -> str:
    if math.isinf(upper):
        return "all" if math.isinf(lower) else f">{lower * scale:g}"
    return f"≤{upper * scale:g}" if math.isinf(lower) else f"{lower * scale:g}–{upper * scale:g}"


def plot_histogram(title: str, buckets: list[tuple[float, float]], path: Path, seconds: bool = True) -> Path:
    """A Prometheus histogram as one bar per bucket, labelled by its bounds.

    Args:
        title: the chart's title.
        buckets: (upper bound `le`, cumulative count) pairs as scraped, `(inf, total)` included.
        path: the PNG to write.
        seconds: bounds are seconds, labelled in ms; False labels them as given (e.g. batch sizes).
    """
    figure, axes = _figure(title, width=10.0)
    counts = bucket_counts(buckets)
    if not counts or sum(count for _, _, count in counts) <= 0:
        _no_data(axes)
    else:
        scale = 1000.0 if seconds else 1.0
        labels = [_bucket_label(low, high, scale) for low, high, _ in counts]
        axes.bar(range(len(counts)), [count for _, _, count in counts])
        axes.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
        axes.set_xlabel("bucket (ms)" if seconds else "bucket")
        axes.set_ylabel("count")
        axes.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)

"""A run's summary: counts, duration, throughput, percentiles, per-adapter figures, fairness, Markdown.

Every case uses hand-made records whose figures are known exactly.
"""

import json

import pytest

from loadtest.records import RequestRecord, RunInfo
from loadtest.summary import TOP_ADAPTERS, distribution, format_number, summarize, to_markdown


def record(adapter="a0", sent=0.0, ttft=0.1, itl=(), latency=1.0, status="ok", prompt_tokens=10, output_tokens=10):
    return RequestRecord(
        index=0,
        adapter=adapter,
        scheduled=sent,
        sent=sent,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        ttft=ttft,
        itl=list(itl),
        latency=latency,
        status=status,
    )


def run_info(duration=0.0, **settings):
    return RunInfo(label="test run", base_url="http://localhost:8000/v1", mode="open", duration=duration, **settings)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], (0, None, None, None, None)),
        ([2.0], (1, 2.0, 2.0, 2.0, 2.0)),
        ([0.5, 0.1, 0.4, 0.2, 0.3], (5, 0.3, 0.46, 0.496, 0.3)),
        ([float(v) for v in range(101)], (101, 50.0, 90.0, 99.0, 50.0)),
    ],
)
def test_distribution_gives_numpy_percentiles_and_mean(values, expected):
    dist = distribution(values)
    assert (dist.count, dist.p50, dist.p90, dist.p99, dist.mean) == pytest.approx(expected)


def test_throughput_is_ok_totals_over_the_run_duration():
    records = [
        record(prompt_tokens=100, output_tokens=10),
        record(prompt_tokens=200, output_tokens=20),
        record(prompt_tokens=400, output_tokens=40, status="http_429"),
    ]
    summary = summarize(run_info(duration=2.0), records)
    assert (summary.requests, summary.ok, summary.duration) == (3, 2, 2.0)
    assert (summary.prompt_tokens, summary.output_tokens) == (300, 30)
    assert summary.requests_per_s == pytest.approx(1.0)
    assert summary.output_tokens_per_s == pytest.approx(15.0)
    assert summary.input_tokens_per_s == pytest.approx(150.0)


@pytest.mark.parametrize(
    "info_duration, records, expected",
    [
        (7.5, [record(sent=1.0, latency=1.0)], 7.5),
        (0.0, [record(sent=1.0, latency=2.0), record(sent=2.0, latency=3.0), record(sent=3.0, latency=None, status="error")], 4.0),
        (0.0, [record(sent=1.0, latency=None, status="error")], 0.0),
        (0.0, [], 0.0),
    ],
)
def test_duration_is_the_runners_else_first_send_to_last_end(info_duration, records, expected):
    assert summarize(run_info(duration=info_duration), records).duration == pytest.approx(expected)


def test_throughput_is_none_when_the_duration_is_zero():
    summary = summarize(run_info(), [record(latency=None, status="error")])
    assert (summary.requests_per_s, summary.output_tokens_per_s, summary.input_tokens_per_s) == (None, None, None)


def test_errors_are_counted_by_status_most_frequent_first():
    statuses = ["ok", "error", "http_429", "http_429", "ok", "http_503", "http_429", "error"]
    summary = summarize(run_info(duration=1.0), [record(status=status) for status in statuses])
    assert list(summary.errors.items()) == [("http_429", 3), ("error", 2), ("http_503", 1)]
    assert summary.ok == 2


def test_latency_figures_count_ok_requests_only_and_pool_every_gap():
    records = [
        record(ttft=0.1, itl=[0.01, 0.03], latency=1.0),
        record(ttft=0.3, itl=[0.02], latency=3.0),
        record(ttft=9.0, itl=[9.0], latency=9.0, status="error"),
    ]
    summary = summarize(run_info(duration=1.0), records)
    assert (summary.ttft.count, summary.ttft.p50, summary.ttft.mean) == (2, pytest.approx(0.2), pytest.approx(0.2))
    assert (summary.itl.count, summary.itl.p50, summary.itl.mean) == (3, pytest.approx(0.02), pytest.approx(0.02))
    assert (summary.latency.count, summary.latency.p50) == (2, pytest.approx(2.0))


def test_per_adapter_figures_most_requested_first():
    records = [
        record("b", ttft=0.2, latency=2.0, output_tokens=10),
        record("a", ttft=0.1, latency=1.0, output_tokens=10),
        record("a", ttft=0.3, latency=2.0, output_tokens=40),
        record("a", ttft=None, latency=None, status="error"),
    ]
    first, second = summarize(run_info(duration=1.0), records).adapters
    assert (first.adapter, first.requests, first.ok) == ("a", 3, 2)
    assert first.median_ttft == pytest.approx(0.2)
    assert first.mean_tokens_per_s == pytest.approx(15.0)  # mean of 10/1 and 40/2
    assert (second.adapter, second.requests, second.ok, second.median_ttft) == ("b", 1, 1, pytest.approx(0.2))


def test_fairness_compares_per_adapter_median_ttft():
    records = [record("fast", ttft=t) for t in (0.05, 0.1, 0.2)] + [record("slow", ttft=t) for t in (0.3, 0.3, 0.9)]
    fair = summarize(run_info(duration=1.0), records).fairness
    assert fair.adapters == 2
    assert (fair.min_median_ttft, fair.max_median_ttft) == (pytest.approx(0.1), pytest.approx(0.3))
    assert fair.ratio == pytest.approx(3.0)
    assert fair.cv == pytest.approx(0.5)  # population std 0.1 over mean 0.2


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="empty run"),
        pytest.param([record("a", ttft=t) for t in (0.1, 0.2, 0.3)], id="one adapter"),
        pytest.param(
            [record("a", ttft=t) for t in (0.1, 0.2, 0.3)] + [record("b", ttft=t) for t in (0.1, 0.2)],
            id="second adapter has 2 requests",
        ),
        pytest.param(
            [record("a", ttft=t) for t in (0.1, 0.2, 0.3)]
            + [record("b"), record("b"), record("b", ttft=None, latency=None, status="http_429")],
            id="second adapter has 3 requests but 2 ok",
        ),
    ],
)
def test_fairness_needs_two_adapters_with_three_ok_requests(records):
    assert summarize(run_info(duration=1.0), records).fairness is None


def test_adapters_with_too_few_ok_requests_do_not_move_fairness():
    qualifying = [record("a", ttft=t) for t in (0.1, 0.1, 0.1)] + [record("b", ttft=t) for t in (0.2, 0.2, 0.2)]
    outlier = [record("c", ttft=50.0), record("c", ttft=50.0)]
    fair = summarize(run_info(duration=1.0), qualifying + outlier).fairness
    assert (fair.adapters, fair.ratio) == (2, pytest.approx(2.0))


def test_empty_run_summarizes_to_zeros_and_nones():
    summary = summarize(run_info(), [])
    assert (summary.requests, summary.ok, summary.errors, summary.duration) == (0, 0, {}, 0.0)
    assert summary.output_tokens_per_s is None
    assert (summary.ttft.count, summary.ttft.p50, summary.itl.p99, summary.latency.mean) == (0, None, None, None)
    assert (summary.adapters, summary.fairness) == ([], None)
    assert "test run" in to_markdown(summary)


def test_to_dict_is_json_ready():
    records = [record("a", ttft=t, itl=[0.01]) for t in (0.1, 0.2, 0.3)] + [record("b", ttft=0.2) for _ in range(3)]
    document = json.loads(json.dumps(summarize(run_info(duration=2.0), records).to_dict()))
    assert document["run"]["label"] == "test run"
    assert document["ttft"]["p50"] == pytest.approx(0.2)
    assert document["fairness"]["adapters"] == 2
    assert document["adapters"][0]["adapter"] == "a"


@pytest.mark.parametrize(
    "value, shown",
    [(None, "–"), (0.0, "0.00"), (1.234, "1.23"), (12.34, "12.3"), (123.4, "123"), (12345.6, "12,346")],
)
def test_format_number_keeps_about_three_significant_figures(value, shown):
    assert format_number(value) == shown


def test_markdown_shows_the_runs_figures():
    records = (
        [record("a", ttft=t, itl=[0.02], latency=1.0, output_tokens=30) for t in (0.1, 0.2, 0.3)]
        + [record("b", ttft=t, latency=1.0, output_tokens=30) for t in (0.3, 0.3, 0.9)]
        + [record("b", ttft=None, latency=None, status="http_429")]
    )
    info = run_info(duration=2.0, rate=4.0, cv=1.0, num_adapters=2, alpha=1.0, max_requests=7, max_seconds=60.0)
    text = to_markdown(summarize(info, records))
    for expected in [
        "### test run",
        "open loop at 4.00 req/s (cv 1), 2 adapters (alpha 1), bounds: 7 requests, 60 s",
        "7 requests, 6 ok, in 2.0 s",
        "| ok requests/s | 3.00 |",
        "| output tokens/s | 90.0 |",
        "| input tokens/s | 30.0 |",
        "| TTFT | 300 |",
        "| ITL | 20.0 | 20.0 | 20.0 | 20.0 |",
        "| end-to-end | 1,000 | 1,000 | 1,000 | 1,000 |",
        "Errors: http_429 × 1.",
        "median TTFT min 200 ms, max 300 ms, max/min 1.50",
        "| `b` | 4 | 3 | 300 |",
        "| `a` | 3 | 3 | 200 |",
    ]:
        assert expected in text


def test_markdown_describes_a_closed_loop_run_on_the_base_model():
    info = RunInfo(label="closed", base_url="u", mode="closed", concurrency=16)
    text = to_markdown(summarize(info, [record("base")]))
    assert "closed loop with 16 concurrent clients, base model only, bounds: none" in text
    assert "Errors: none." in text
    assert "Fairness: n/a" in text


def test_markdown_lists_only_the_top_adapters():
    records = [record(f"adapter-{i:02d}") for i in range(TOP_ADAPTERS + 5) for _ in range(TOP_ADAPTERS + 5 - i)]
    text = to_markdown(summarize(run_info(duration=1.0), records))
    assert f"`adapter-{TOP_ADAPTERS - 1:02d}`" in text
    assert f"`adapter-{TOP_ADAPTERS:02d}`" not in text

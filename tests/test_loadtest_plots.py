"""Every plot writes a valid PNG, for normal and for empty inputs, and the helpers bin data exactly.

What a figure looks like is not checked; that it is written, and never raises, is.
"""

import math

import numpy as np
import pytest

from loadtest.plots import bucket_counts, chunk_times, per_second_bins, plot_bars, plot_histogram, plot_lines, plot_run, slug
from loadtest.records import RequestRecord, RunInfo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INFO = RunInfo(label="loraplex (alpha=1)", base_url="http://localhost:8000/v1", mode="open", rate=4.0)


def assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 1000


def sample_records():
    records = []
    for index in range(60):
        status = ["ok", "ok", "ok", "http_429", "error"][index % 5]
        ok = status == "ok"
        records.append(
            RequestRecord(
                index=index,
                adapter=f"adapter-{index % 7}",
                scheduled=index * 0.1,
                sent=index * 0.1,
                prompt_tokens=20,
                output_tokens=8 if ok else 0,
                ttft=0.05 + 0.01 * (index % 4) if ok else None,
                itl=[0.0, 0.02, 0.03] if ok else [],
                latency=0.5 + 0.01 * index if status != "error" else None,
                status=status,
            )
        )
    return records


@pytest.mark.parametrize("records", [pytest.param(sample_records(), id="run"), pytest.param([], id="empty")])
def test_plot_run_writes_four_pngs_named_by_the_label(tmp_path, records):
    paths = plot_run(INFO, records, tmp_path / "figures")
    assert len(paths) == 4
    assert all(path.name.startswith("loraplex-alpha-1-") for path in paths)
    for path in paths:
        assert_png(path)


def test_plot_run_copes_with_requests_that_all_failed(tmp_path):
    failed = [RequestRecord(index=0, adapter="a", scheduled=0.0, sent=0.0, prompt_tokens=5, status="error")]
    for path in plot_run(INFO, failed, tmp_path):
        assert_png(path)


@pytest.mark.parametrize(
    "labels, values",
    [(["loraplex", "PEFT naive", "PEFT mixed"], [1234.5, 98.7, 345.6]), ([], [])],
    ids=["servers", "empty"],
)
def test_plot_bars_writes_a_png(tmp_path, labels, values):
    assert_png(plot_bars("output tokens/s", labels, values, "tokens/s", tmp_path / "bars.png"))


@pytest.mark.parametrize(
    "series, logx",
    [
        ({"alpha=0": [(1, 900.0), (10, 850.0), (100, 700.0)], "alpha=1": [(100, 820.0), (1, 900.0)]}, True),
        ({"alpha=0": [(1, 900.0)]}, False),
        ({}, False),
        ({"alpha=0": []}, True),
    ],
    ids=["two lines", "one point", "no series", "empty series"],
)
def test_plot_lines_writes_a_png(tmp_path, series, logx):
    assert_png(plot_lines("throughput", "adapters", "tokens/s", series, tmp_path / "lines.png", logx=logx))


@pytest.mark.parametrize(
    "buckets",
    [
        [(0.005, 1.0), (0.01, 4.0), (0.025, 10.0), (0.05, 30.0), (math.inf, 42.0)],
        [(math.inf, 3.0)],
        [(0.01, 0.0), (math.inf, 0.0)],
        [],
    ],
    ids=["ttft", "only inf", "all zero", "empty"],
)
def test_plot_histogram_writes_a_png(tmp_path, buckets):
    assert_png(plot_histogram("TTFT", buckets, tmp_path / "histogram.png"))


def test_plot_histogram_of_unitless_buckets_writes_a_png(tmp_path):
    assert_png(plot_histogram("batch size", [(1, 5.0), (8, 9.0), (math.inf, 10.0)], tmp_path / "batch.png", seconds=False))


def test_bucket_counts_undo_the_cumulative_sums():
    buckets = [(math.inf, 42.0), (0.01, 4.0), (0.005, 1.0)]
    assert bucket_counts(buckets) == [(-math.inf, 0.005, 1.0), (0.005, 0.01, 3.0), (0.01, math.inf, 38.0)]


def test_chunk_times_start_at_the_first_token_and_follow_the_gaps():
    record = RequestRecord(index=0, adapter="a", scheduled=1.0, sent=1.0, prompt_tokens=5, ttft=0.5, itl=[0.25, 0.25])
    assert chunk_times(record).tolist() == [1.5, 1.75, 2.0]


def test_per_second_bins_sum_weights_and_clamp_to_the_range():
    times = np.array([-0.1, 0.2, 0.9, 1.0, 2.5, 7.0])
    assert per_second_bins(times, np.ones(6), 3).tolist() == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("label, expected", [("loraplex (alpha=1)", "loraplex-alpha-1"), ("PEFT mixed", "peft-mixed"), ("!!", "run")])
def test_slug_is_file_name_safe(label, expected):
    assert slug(label) == expected

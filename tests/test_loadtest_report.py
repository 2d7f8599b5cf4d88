"""The suite's report: the sweep's goal ratios from run summaries, BENCHMARKS.md sections, histogram reading.

The compare phase's ratios are test_loadtest_rounds.py's.
"""

import pytest

from loadtest.records import RequestRecord, RunInfo
from loadtest.report import SuiteResults, measured_ratios, render_section, replace_section
from loadtest.servers import histogram_delta, histogram_quantile
from loadtest.suite_config import SuiteConfig
from loadtest.summary import summarize

INF = float("inf")


def results_with(throughputs: dict[str, float]) -> SuiteResults:
    """Suite results whose runs have the given output tokens/s (one 1-second run each)."""
    results = SuiteResults(device="CPU", model_config="tiny", settings=SuiteConfig())
    for label, tokens in throughputs.items():
        record = RequestRecord(0, "a", scheduled=0, sent=0, prompt_tokens=4, output_tokens=int(tokens), ttft=0.1, latency=1.0)
        results.runs[label] = summarize(RunInfo(label=label, base_url="", mode="closed", duration=1.0), [record])
    return results


def test_each_goal_ratio_divides_the_throughputs_of_its_two_runs():
    results = results_with(
        {
            "loraplex base only": 1000,
            "loraplex N=8 alpha=0": 900, "loraplex N=8 alpha=1": 800,
            "loraplex N=64 alpha=0": 700, "loraplex N=64 alpha=1": 750,
            "loraplex N=512 alpha=0": 450, "loraplex N=512 alpha=1": 720,
        }
    )  # fmt: skip
    ratios = {name: (value, goal) for name, value, goal in measured_ratios(results)}
    assert ratios == {
        "loraplex(N=64) / loraplex(base only), alpha=0": (pytest.approx(0.7), 0.75),
        "loraplex(N=64) / loraplex(base only), alpha=1": (pytest.approx(0.75), 0.75),
        "throughput(N=512) / throughput(N=8), alpha=0": (pytest.approx(0.5), 0.85),
        "throughput(N=512) / throughput(N=8), alpha=1": (pytest.approx(0.9), 0.85),
    }
    section = render_section(results, {}, SuiteConfig().out)
    assert "| loraplex(N=64) / loraplex(base only), alpha=1 | 0.75 | ≥ 0.75 | ✓ |" in section
    assert "| throughput(N=512) / throughput(N=8), alpha=0 | 0.50 | ≥ 0.85 | ✗ |" in section


def test_a_ratio_whose_run_is_missing_is_reported_as_unmeasured():
    ratios = measured_ratios(results_with({"loraplex base only": 1000}))
    assert all(value is None for _, value, _ in ratios)


def test_a_section_replaces_its_previous_version_and_leaves_the_others():
    document = "# Benchmarks\n\n<!-- suite:cpu-tiny -->old cpu<!-- /suite:cpu-tiny -->\n\n<!-- suite:cuda-x -->gpu<!-- /suite:cuda-x -->\n"
    updated = replace_section(document, "<!-- suite:cpu-tiny -->new cpu<!-- /suite:cpu-tiny -->", "cpu-tiny")
    assert updated == document.replace("old cpu", "new cpu")


def test_a_new_section_is_appended():
    updated = replace_section("# Benchmarks\n", "<!-- suite:a -->x<!-- /suite:a -->", "a")
    assert updated == "# Benchmarks\n\n<!-- suite:a -->x<!-- /suite:a -->\n"


@pytest.mark.parametrize(
    "buckets, quantile, expected",
    [
        ([(0.1, 0.0), (0.2, 10.0), (INF, 10.0)], 0.5, 0.15),  # all in (0.1, 0.2]: interpolate
        ([(0.1, 5.0), (0.2, 10.0), (INF, 10.0)], 0.5, 0.1),
        ([(0.1, 0.0), (0.2, 0.0), (INF, 4.0)], 0.99, 0.2),  # beyond the last bound: the last bound
        ([(0.1, 0.0), (INF, 0.0)], 0.5, None),
        ([], 0.5, None),
    ],
)
def test_histogram_quantile_interpolates_like_prometheus(buckets, quantile, expected):
    assert histogram_quantile(buckets, quantile) == (pytest.approx(expected) if expected is not None else None)


def test_histogram_delta_is_what_each_bucket_gained():
    before = [(0.1, 1.0), (INF, 2.0)]
    after = [(0.1, 4.0), (INF, 7.0)]
    assert histogram_delta(before, after) == [(0.1, 3.0), (INF, 5.0)]


@pytest.mark.parametrize(
    ("peft", "said"),
    [(True, "the PEFT baselines at N = 64 only"), (False, "the PEFT baselines left out (`--no-peft`)")],
)
def test_the_section_says_whether_the_peft_baselines_ran(peft, said):
    results = SuiteResults(device="CPU", model_config="tiny", settings=SuiteConfig(peft_baselines=peft))
    section = render_section(results, {}, SuiteConfig().out)
    assert said in section
    assert ("--model-config tiny --no-peft`" in section) is not peft

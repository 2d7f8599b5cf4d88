"""The compare phase's ratios: per round, their median, their goals, and the tables that show them."""

import pytest

from loadtest.compare import round_order
from loadtest.records import RequestRecord, RunInfo
from loadtest.report import SuiteResults, render_section
from loadtest.rounds import Goal, RoundRatio, RoundRun, compare_ratios, per_round_ratios, ratio_table, runs_table
from loadtest.suite_config import SuiteConfig
from loadtest.summary import summarize


def summary(tokens_per_s: float, ttft: float = 0.1, itl: float = 0.02):
    """A 1-second run of one ok request: `tokens_per_s` output tokens, the given TTFT and one ITL gap."""
    record = RequestRecord(0, "a", 0, 0, prompt_tokens=4, output_tokens=int(tokens_per_s), ttft=ttft, itl=[itl], latency=1.0)
    return summarize(RunInfo(label="run", base_url="", mode="closed", duration=1.0), [record])


def run(server: str, adapters: int, round_number: int, tokens_per_s: float, ttft: float = 0.1, itl: float = 0.02) -> RoundRun:
    return RoundRun(server, adapters, round_number, 1, summary(tokens_per_s, ttft, itl))


@pytest.mark.parametrize(
    "round_index, expected",
    [(0, ["a", "b", "c"]), (1, ["c", "b", "a"]), (2, ["a", "b", "c"]), (3, ["c", "b", "a"])],
)
def test_the_server_order_is_reversed_every_other_round(round_index, expected):
    assert round_order(["a", "b", "c"], round_index) == expected


def test_over_an_even_number_of_rounds_every_server_goes_first_or_last_equally():
    firsts = [round_order(["a", "b", "c", "d"], index)[0] for index in range(4)]
    assert firsts == ["a", "d", "a", "d"]


def test_a_ratio_is_taken_within_each_round():
    runs = [run("loraplex", 8, 1, 300), run("vLLM", 8, 1, 200), run("loraplex", 8, 2, 200), run("vLLM", 8, 2, 400)]
    assert per_round_ratios(runs, ("loraplex", 8), ("vLLM", 8), "output tok/s") == [pytest.approx(1.5), pytest.approx(0.5)]


def test_a_round_missing_either_run_has_no_ratio():
    runs = [run("loraplex", 8, 1, 300), run("vLLM", 8, 1, 200), run("loraplex", 8, 2, 300)]
    assert per_round_ratios(runs, ("loraplex", 8), ("vLLM", 8), "output tok/s") == [pytest.approx(1.5), None]


@pytest.mark.parametrize(
    "per_round, median",
    [
        ([1.5, 0.9, 1.3], 1.3),  # not the ratio of the summed throughputs: one round cannot carry it
        ([2.0, 1.0], 1.5),
        ([None, 1.1, None], 1.1),
        ([None], None),
        ([], None),
    ],
)
def test_the_reported_value_is_the_median_of_the_rounds_ratios(per_round, median):
    assert RoundRatio("r", per_round).median == (pytest.approx(median) if median is not None else None)


@pytest.mark.parametrize(
    "goal, value, met",
    [(Goal(1.2), 1.2, True), (Goal(1.2), 1.19, False), (Goal(1.0, at_most=True), 1.0, True), (Goal(1.0, at_most=True), 1.01, False)],
)
def test_a_goal_is_a_lower_or_an_upper_bound(goal, value, met):
    assert goal.met(value) is met


def test_latency_ratios_pass_when_loraplex_is_no_slower():
    runs = [run("loraplex", 0, 1, 300, ttft=0.05, itl=0.03), run("vLLM", 0, 1, 200, ttft=0.1, itl=0.02)]
    ratios = {ratio.name: ratio for ratio in compare_ratios(runs)}
    assert ratios["loraplex / vLLM, TTFT p50, N=0"].median == pytest.approx(0.5)
    assert ratios["loraplex / vLLM, TTFT p50, N=0"].verdict == "✓"
    assert ratios["loraplex / vLLM, ITL p50, N=0"].verdict == "✗"


def full_runs(rounds: int = 3) -> list[RoundRun]:
    runs = []
    for round_number in range(1, rounds + 1):
        for count, loraplex, vllm in ((0, 1000, 800), (8, 900, 800), (64, 850, 600)):
            runs += [run("loraplex", count, round_number, loraplex + round_number), run("vLLM", count, round_number, vllm)]
        runs += [run("PEFT naive", 64, round_number, 80), run("PEFT mixed", 64, round_number, 300)]
    return runs


def test_every_ratio_the_suite_is_judged_by_has_its_goal():
    goals = {ratio.name: (None if ratio.goal is None else str(ratio.goal)) for ratio in compare_ratios(full_runs())}
    assert goals == {
        **{f"loraplex / vLLM, output tok/s, N={n}": "≥ 1.2" for n in (0, 8, 64)},
        **{f"loraplex / vLLM, {metric}, N={n}": "≤ 1" for n in (0, 8, 64) for metric in ("TTFT p50", "ITL p50")},
        "loraplex N=64 / loraplex N=0 (base only), output tok/s": "≥ 0.8",
        "vLLM N=64 / vLLM N=0 (base only), output tok/s": None,
        "loraplex / PEFT naive, output tok/s, N=64": "≥ 10",
        "loraplex / PEFT mixed, output tok/s, N=64": "≥ 2",
    }


def test_without_vllm_only_loraplex_and_peft_ratios_are_reported():
    runs = [run for run in full_runs() if run.server != "vLLM"]
    assert [ratio.name for ratio in compare_ratios(runs)] == [
        "loraplex N=64 / loraplex N=0 (base only), output tok/s",
        "loraplex / PEFT naive, output tok/s, N=64",
        "loraplex / PEFT mixed, output tok/s, N=64",
    ]


def test_the_ratio_table_lists_the_median_each_round_and_the_verdict():
    lines = ratio_table([RoundRatio("loraplex / vLLM, output tok/s, N=8", [1.25, None, 1.1], Goal(1.2))])
    assert lines[-1] == "| loraplex / vLLM, output tok/s, N=8 | 1.18 | 1.25, –, 1.10 | ≥ 1.2 | ✗ |"


def test_the_runs_table_has_one_row_per_server_n_and_round_grouped_by_n():
    rows = runs_table(full_runs(rounds=2))[2:]
    assert len(rows) == 2 * (3 * 2 + 2)
    first = [tuple(row.strip("| ").split(" | ")[:3]) for row in rows[:4]]
    assert first == [("loraplex", "0", "1"), ("loraplex", "0", "2"), ("vLLM", "0", "1"), ("vLLM", "0", "2")]


@pytest.mark.parametrize("with_vllm", [True, False])
def test_the_section_says_whether_vllm_ran(with_vllm):
    runs = [run for run in full_runs() if with_vllm or run.server != "vLLM"]
    results = SuiteResults(device="CPU", model_config="tiny", settings=SuiteConfig(), compare=runs)
    section = render_section(results, {}, SuiteConfig().out)
    assert ("base-only (N = 0) figure is with LoRA enabled" in section) is with_vllm
    assert ("vLLM was left out of this run (no `--vllm-python`)" in section) is not with_vllm
    assert "| loraplex / PEFT naive, output tok/s, N=64 | 10.65 | 10.64, 10.65, 10.66 | ≥ 10 | ✓ |" in section

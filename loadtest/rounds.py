"""The compare phase's figures: one run per (server, N, round), and ratios taken round by round.

Owns: `RoundRun` (one measured run of the compare phase), `Goal` and `RoundRatio` (a ratio's value
in each round, their median, its goal), the ratios the suite is judged by (`compare_ratios`) and
the phase's two Markdown tables. A ratio is computed within each round, between runs of one trace
minutes apart on servers that are all up, and the median of those per-round ratios is reported,
so one noisy round cannot carry it. It must not run or plot anything.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.suite_config import COMPARE_COUNTS
from loadtest.summary import Summary, format_ms, format_number

LORAPLEX, VLLM, PEFT_NAIVE, PEFT_MIXED = "loraplex", "vLLM", "PEFT naive", "PEFT mixed"
SERVERS = (LORAPLEX, VLLM, PEFT_NAIVE, PEFT_MIXED)  # the report's order

METRICS: dict[str, Callable[[Summary], float | None]] = {
    "output tok/s": lambda summary: summary.output_tokens_per_s,
    "TTFT p50": lambda summary: summary.ttft.p50,
    "ITL p50": lambda summary: summary.itl.p50,
}


@dataclass(frozen=True)
class RoundRun:
    """One run of the compare phase.

    Args:
        server: one of `SERVERS`.
        adapters: N, the adapters its trace spreads requests over (0: the base only).
        round: 1-based.
        position: 1 for the first server to run this N in this round, 2 for the next, ...
        summary: what it measured.
    """

    server: str
    adapters: int
    round: int
    position: int
    summary: Summary


@dataclass(frozen=True)
class Goal:
    """A bound a ratio must reach: at least `bound`, or at most it when `at_most`."""

    bound: float
    at_most: bool = False

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"


@dataclass(frozen=True)
class RoundRatio:
    """A ratio measured in every round.

    Args:
        name: what it divides.
        per_round: its value in each round, first round first; None where a run is missing.
        goal: None for a ratio reported without one.
    """

    name: str
    per_round: list[float | None]
    goal: Goal | None = None

    @property
    def median(self) -> float | None:
        """The median of the rounds that have a value; None when none has."""
        values = [value for value in self.per_round if value is not None]
        return statistics.median(values) if values else None

    @property
    def verdict(self) -> str:
        median = self.median
        if self.goal is None or median is None:
            return "–"
        return "✓" if self.goal.met(median) else "✗"


def per_round_ratios(runs: list[RoundRun], numerator: tuple[str, int], denominator: tuple[str, int], metric: str) -> list[float | None]:
    """`metric` of run (server, N) `numerator` over that of `denominator`, in each round of `runs`.

    Args:
        runs: the compare phase's runs.
        numerator, denominator: (server, N).
        metric: a `METRICS` name.
    """
    by_key = {(run.server, run.adapters, run.round): run.summary for run in runs}
    ratios = []
    for round_number in sorted({run.round for run in runs}):
        top, bottom = (by_key.get((*key, round_number)) for key in (numerator, denominator))
        top_value = None if top is None else METRICS[metric](top)
        bottom_value = None if bottom is None else METRICS[metric](bottom)
        ratios.append(top_value / bottom_value if top_value is not None and bottom_value else None)
    return ratios


def compare_ratios(runs: list[RoundRun]) -> list[RoundRatio]:
    """loraplex against vLLM (when it ran) at every N, against itself at N=0, and against PEFT."""
    served = {run.server for run in runs}
    top, base = max(COMPARE_COUNTS), min(COMPARE_COUNTS)
    at_least, at_most = Goal(1.2), Goal(1.0, at_most=True)
    ratios = []
    if VLLM in served:
        for count in COMPARE_COUNTS:
            for metric, goal in (("output tok/s", at_least), ("TTFT p50", at_most), ("ITL p50", at_most)):
                values = per_round_ratios(runs, (LORAPLEX, count), (VLLM, count), metric)
                ratios.append(RoundRatio(f"loraplex / vLLM, {metric}, N={count}", values, goal))
    for server, goal in ((LORAPLEX, Goal(0.8)), (VLLM, None)):
        if server in served:
            values = per_round_ratios(runs, (server, top), (server, base), "output tok/s")
            ratios.append(RoundRatio(f"{server} N={top} / {server} N={base} (base only), output tok/s", values, goal))
    for server, goal in ((PEFT_NAIVE, Goal(10.0)), (PEFT_MIXED, Goal(2.0))):
        values = per_round_ratios(runs, (LORAPLEX, top), (server, top), "output tok/s")
        ratios.append(RoundRatio(f"loraplex / {server}, output tok/s, N={top}", values, goal))
    return ratios


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def ratio_table(ratios: list[RoundRatio]) -> list[str]:
    """Markdown: each ratio's median over the rounds, its value in each round, its goal."""
    lines = ["| ratio | median of rounds | per round | goal | |", "|---|---|---|---|---|"]
    for ratio in ratios:
        per_round = ", ".join(_ratio(value) for value in ratio.per_round)
        goal = "–" if ratio.goal is None else str(ratio.goal)
        lines.append(f"| {ratio.name} | {_ratio(ratio.median)} | {per_round} | {goal} | {ratio.verdict} |")
    return lines


def runs_table(runs: list[RoundRun]) -> list[str]:
    """Markdown: one row per (server, N, round), by N, then server, then round."""
    lines = [
        "| server | N | round | order in round | ok / sent | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda run: (run.adapters, SERVERS.index(run.server), run.round)):
        summary = run.summary
        errors = ", ".join(f"{status}: {count}" for status, count in summary.errors.items()) or "0"
        lines.append(
            f"| {run.server} | {run.adapters} | {run.round} | {run.position} | {summary.ok} / {summary.requests} | "
            f"{format_number(summary.output_tokens_per_s)} | {format_ms(summary.ttft.p50)} | {format_ms(summary.itl.p50)} | {errors} |"
        )
    return lines


def median_throughput(runs: list[RoundRun], server: str, count: int) -> float | None:
    """The median over rounds of `server`'s output tok/s at N = `count`."""
    values = [run.summary.output_tokens_per_s for run in runs if run.server == server and run.adapters == count]
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None

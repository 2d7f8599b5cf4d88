"""The fleet benchmark's results: its JSON file, its tables on the console and as Markdown.

Owns: `FleetResults` (the stores built, the start-ups, the load runs or why they were skipped),
the per-(shape, N, alpha) figures the issue judges (budgeted / all-resident throughput, at least
0.8; cold / warm TTFT p50 under the budget, at most 2; each a median of per-round ratios, as in
rounds.py), and their two tables, printed with rich and as a Markdown block for BENCHMARKS.md.
It must not run anything.
"""

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadtest.fleet_load import ALL_RESIDENT, BUDGETED, FleetRun
from loadtest.fleet_startup import READY, StartupResult
from loadtest.rounds import Goal, RoundRatio
from loadtest.summary import format_ms, format_number

THROUGHPUT_GOAL = Goal(0.8)
TTFT_GOAL = Goal(2.0, at_most=True)


@dataclass
class FleetResults:
    """Everything one `python -m loadtest.fleet` measured, as its JSON file holds it."""

    machine: str
    settings: dict
    stores: list[str] = field(default_factory=list)  # how each store was built, in words
    startup: list[StartupResult] = field(default_factory=list)
    runs: list[FleetRun] = field(default_factory=list)
    fleet_skipped: str | None = None  # why the load part did not run

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {**asdict(self), "fleet": [row.to_dict() for row in fleet_rows(self.runs)]}
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")  # Paths as strings


@dataclass
class FleetRow:
    """The figures of one (shape, N, alpha): medians over rounds, and the two ratios round by round."""

    model_config: str
    adapters: int
    alpha: float
    all_resident_tokens_per_s: float | None
    budgeted_tokens_per_s: float | None
    throughput: RoundRatio
    cold_ttft_p50: float | None  # under the budget
    warm_ttft_p50: float | None
    ttft: RoundRatio
    cold_requests: int  # under the budget, over the rounds
    server_loads: float | None  # the server's loads those stand for (fleet_load.server_loads); None where it does not count them

    def to_dict(self) -> dict:
        """Plain JSON values; each ratio with its rounds, median, goal and verdict."""
        body = asdict(self)
        for name in ("throughput", "ttft"):
            ratio: RoundRatio = getattr(self, name)
            body[name] = {"per_round": ratio.per_round, "median": ratio.median, "goal": str(ratio.goal), "verdict": ratio.verdict}
        return body


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _divide(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def fleet_rows(runs: list[FleetRun]) -> list[FleetRow]:
    """One row per (shape, N, alpha) of `runs`, in the order they ran."""
    keys = list(dict.fromkeys((run.model_config, run.adapters, run.alpha) for run in runs))
    rows = []
    for key in keys:
        mine = [run for run in runs if (run.model_config, run.adapters, run.alpha) == key and run.status == "ok"]
        by_round = {(run.variant, run.round): run for run in mine}
        rounds = sorted({run.round for run in runs if (run.model_config, run.adapters, run.alpha) == key})
        resident = [by_round.get((ALL_RESIDENT, number)) for number in rounds]
        budgeted = [by_round.get((BUDGETED, number)) for number in rounds]
        tokens = [_divide(b and b.output_tokens_per_s, a and a.output_tokens_per_s) for a, b in zip(resident, budgeted)]
        ttft = [_divide(b.cold_ttft_p50, b.warm_ttft_p50) if b else None for b in budgeted]
        loads = [run.server_loads for run in budgeted if run is not None]
        rows.append(
            FleetRow(
                *key,
                all_resident_tokens_per_s=_median([run.output_tokens_per_s for run in resident if run]),
                budgeted_tokens_per_s=_median([run.output_tokens_per_s for run in budgeted if run]),
                throughput=RoundRatio("budgeted / all-resident, output tok/s", tokens, THROUGHPUT_GOAL),
                cold_ttft_p50=_median([run.cold_ttft_p50 for run in budgeted if run]),
                warm_ttft_p50=_median([run.warm_ttft_p50 for run in budgeted if run]),
                ttft=RoundRatio("cold / warm TTFT p50, budgeted", ttft, TTFT_GOAL),
                cold_requests=sum(run.cold_requests for run in budgeted if run),
                server_loads=None if not loads or None in loads else sum(loads),
            )
        )
    return rows


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def _ratio(ratio: RoundRatio) -> str:
    return "–" if ratio.median is None else f"{ratio.median:.2f} {ratio.verdict}"


def startup_table(results: FleetResults) -> tuple[list[str], list[list[str]]]:
    header = ["model shape", "N", "start-up (s)", "server RSS (MiB)", "engine RSS (MiB)", "models listed"]
    rows = []
    for start in results.startup:
        seconds = f"{start.seconds:.1f}" if start.status == READY else f"{start.status} after {start.seconds:.0f} s"
        listed = "–" if start.models_listed is None else f"{start.models_listed:,} / {start.adapters:,}"
        rows.append([start.model_config, f"{start.adapters:,}", seconds, _mib(start.server_peak_rss), _mib(start.engine_peak_rss), listed])
    return header, rows


def fleet_table(results: FleetResults) -> tuple[list[str], list[list[str]]]:
    header = [
        "shape", "N", "α", "all-resident tok/s", "budgeted tok/s", f"ratio ({THROUGHPUT_GOAL})",
        "cold TTFT p50 (ms)", "warm TTFT p50 (ms)", f"ratio ({TTFT_GOAL})", "cold requests / server loads",
    ]  # fmt: skip
    rows = []
    for row in fleet_rows(results.runs):
        loads = "–" if row.server_loads is None else f"{row.server_loads:,.0f}"
        rows.append([
            row.model_config, f"{row.adapters:,}", f"{row.alpha:g}", format_number(row.all_resident_tokens_per_s),
            format_number(row.budgeted_tokens_per_s), _ratio(row.throughput), format_ms(row.cold_ttft_p50),
            format_ms(row.warm_ttft_p50), _ratio(row.ttft), f"{row.cold_requests:,} / {loads}",
        ])  # fmt: skip
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(row)} |" for row in rows)]


def markdown_block(results: FleetResults) -> str:
    """The start-up and fleet tables, with the notes a reader needs, ready to paste into BENCHMARKS.md."""
    lines = [f"Adapter fleet (`python -m loadtest.fleet`), {results.machine}.", ""]
    lines += [f"- {store}" for store in results.stores]
    if results.startup:
        bound = results.settings["max_rss_bytes"] / 2**30
        lines += ["", f"Start-up: spawn to `/health` 200; peak RSS is VmHWM once every adapter is listed; a server whose "
                  f"processes pass {bound:.1f} GiB resident together is killed (over memory bound).", ""]  # fmt: skip
        lines += markdown(*startup_table(results))
    if results.fleet_skipped:
        lines += ["", f"Fleet runs skipped: {results.fleet_skipped}"]
    elif results.runs:
        lines += [
            "",
            "Fleet runs: a fresh server per run, every adapter primed with one token; budgeted = host budget at "
            f"{results.settings['budget_fraction']:g} of the N adapters' bytes. Cold = the adapter was not among the "
            "max(budget / adapter bytes, --max-loras) used last (a model of LRU tiers: host memory and device slots); "
            "server loads = the server's count of loads into the larger of the two (host: "
            "`loraplex_adapter_tier_loads_total{tier=\"host\"}`; slots: `{tier=\"device\"}`, else "
            "`loraplex_adapter_load_seconds`), against which the cold count is checked. Ratios are medians of per-round ratios.",
            "",
        ]
        lines += markdown(*fleet_table(results))
    return "\n".join(lines) + "\n"


def print_results(results: FleetResults, console: Console | None = None) -> None:
    """Both tables with rich, then the Markdown block."""
    console = console or Console()
    for title, (header, rows) in (("start-up", startup_table(results)), ("fleet", fleet_table(results))):
        if rows:
            table = Table(*header, title=f"loraplex adapter fleet: {title}")
            for row in rows:
                table.add_row(*row)
            console.print(table)
    if results.fleet_skipped:
        console.print(f"[yellow]fleet runs skipped:[/] {results.fleet_skipped}")
    console.print("\nMarkdown for BENCHMARKS.md:\n", markup=False)
    print(markdown_block(results))

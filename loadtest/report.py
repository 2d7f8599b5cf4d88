"""The benchmark suite's results, and their section of BENCHMARKS.md.

Owns: `SuiteResults` (the loraplex sweep's run summaries, the compare phase's runs, the
cold-start and warm-switch measurements), the sweep's goal ratios, and `write_section`, which
prints the ratios, draws the suite's plots and puts one Markdown section per device and model
into BENCHMARKS.md between markers, replacing that section's previous version and leaving every
other section as it was. The compare phase's ratios and tables are rounds.py's. It must not run
anything.
"""

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from loadtest.plots import plot_bars, plot_histogram, plot_lines
from loadtest.rounds import LORAPLEX, SERVERS, VLLM, RoundRun, compare_ratios, median_throughput, ratio_table, runs_table
from loadtest.servers import histogram_quantile
from loadtest.suite_config import COMPARE_COUNTS
from loadtest.summary import Summary, format_ms, format_number

HEADER = """# Benchmarks

Written by `python -m loadtest.suite` (see the README's Benchmark section). Every figure in a
section comes from one run of the suite on one machine: servers on 127.0.0.1, a random checkpoint
of the named shape, random rank-16 adapters on all seven projections, closed-loop clients
streaming greedy completions with `ignore_eos`. Throughput is output tokens per second.
"""
BASE = "loraplex base only"


@dataclass
class SuiteResults:
    device: str
    model_config: str
    settings: Any  # the SuiteConfig
    runs: dict[str, Summary] = field(default_factory=dict)  # the loraplex sweep's, by label
    compare: list[RoundRun] = field(default_factory=list)
    cold_client: list[tuple[float, float]] = field(default_factory=list)  # (register, register + first token) seconds
    cold_register: list[tuple[float, float]] = field(default_factory=list)  # histogram buckets (le, cumulative)
    cold_slot: list[tuple[float, float]] = field(default_factory=list)
    warm_switch: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def throughput(self, label: str) -> float | None:
        summary = self.runs.get(label)
        return None if summary is None else summary.output_tokens_per_s


def goal_ratios(results: SuiteResults) -> list[tuple[str, str, str, float]]:
    """(name, numerator run, denominator run, goal) of each ratio of the loraplex sweep."""
    top, low = max(results.settings.adapter_counts), 8
    ratios = []
    for alpha in ("0", "1"):
        ratios.append((f"loraplex(N=64) / loraplex(base only), alpha={alpha}", f"loraplex N=64 alpha={alpha}", BASE, 0.75))
    for alpha in ("0", "1"):
        name = f"throughput(N={top}) / throughput(N={low}), alpha={alpha}"
        ratios.append((name, f"loraplex N={top} alpha={alpha}", f"loraplex N={low} alpha={alpha}", 0.85))
    return ratios


def measured_ratios(results: SuiteResults) -> list[tuple[str, float | None, float]]:
    """(name, value or None, goal) of each goal ratio."""
    rows = []
    for name, numerator, denominator, goal in goal_ratios(results):
        top, bottom = results.throughput(numerator), results.throughput(denominator)
        rows.append((name, top / bottom if top and bottom else None, goal))
    return rows


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _runs_table(results: SuiteResults) -> list[str]:
    lines = [
        "| run | ok / sent | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | "
        "TTFT spread across adapters | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, summary in results.runs.items():
        spread = summary.fairness.ratio if summary.fairness is not None else None
        errors = ", ".join(f"{status}: {count}" for status, count in summary.errors.items()) or "0"
        lines.append(
            f"| {label} | {summary.ok} / {summary.requests} | {format_number(summary.requests_per_s)} | "
            f"{format_number(summary.output_tokens_per_s)} | {format_ms(summary.ttft.p50)} | {format_ms(summary.ttft.p99)} | "
            f"{format_ms(summary.itl.p50)} | {format_ms(summary.itl.p99)} | {format_number(spread)}{'×' if spread else ''} | {errors} |"
        )
    return lines


def _histogram_line(name: str, buckets: list[tuple[float, float]]) -> str:
    count = int(buckets[-1][1]) if buckets else 0
    p50, p99 = histogram_quantile(buckets, 0.5), histogram_quantile(buckets, 0.99)
    return f"| {name} | {count} | {format_ms(p50)} | {format_ms(p99)} |"


def quantile(values: list[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def _adapter_latency(results: SuiteResults) -> list[str]:
    register = [seconds for seconds, _ in results.cold_client]
    first_token = [seconds for _, seconds in results.cold_client]
    return [
        "| measurement | count | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|",
        f"| client: `POST /v1/load_lora_adapter` (disk to host) | {len(register)} | {format_ms(quantile(register, 0.5))} | "
        f"{format_ms(quantile(register, 0.99))} |",
        f"| client: load, then a 1-token completion (disk to device to token) | {len(first_token)} | "
        f"{format_ms(quantile(first_token, 0.5))} | {format_ms(quantile(first_token, 0.99))} |",
        _histogram_line("server: `loraplex_adapter_register_seconds{source=\"path\"}` (read, validate, register)", results.cold_register),
        _histogram_line("server: `loraplex_adapter_load_seconds` during the cold starts (host to slot)", results.cold_slot),
        _histogram_line("server: `loraplex_adapter_load_seconds` over the N sweep (warm switches)", results.warm_switch),
    ]


def draw_plots(results: SuiteResults, out_dir: Path) -> dict[str, Path]:
    """The suite's own plots: throughput by N and alpha, the servers compared, adapter latencies."""
    base = results.throughput(BASE) or 0.0
    series = {}
    for alpha in ("0", "1"):
        points = [(count, results.throughput(f"loraplex N={count} alpha={alpha}")) for count in results.settings.adapter_counts]
        series[f"alpha={alpha}"] = [(count, value) for count, value in points if value is not None]
    series["base only"] = [(count, base) for count in results.settings.adapter_counts]
    top = max(COMPARE_COUNTS)
    servers = [server for server in SERVERS if any(run.server == server for run in results.compare)]
    by_count = {
        server: [(count, value) for count in COMPARE_COUNTS if (value := median_throughput(results.compare, server, count)) is not None]
        for server in servers
    }
    values = [median_throughput(results.compare, server, top) or 0.0 for server in servers]
    return {
        "throughput vs adapters": plot_lines(
            "loraplex throughput vs number of adapters", "adapters (N)", "output tokens/s", series,
            out_dir / "throughput-vs-adapters.png", logx=True,
        ),
        "servers by N": plot_lines(
            "Servers side by side (median of rounds)", "adapters (N)", "output tokens/s", by_count, out_dir / "servers-by-n.png",
        ),
        f"servers at N={top}": plot_bars(
            f"Same trace, {top} adapters (median of rounds)", servers, values, "output tokens/s", out_dir / f"servers-n{top}.png",
        ),
        "cold registration": plot_histogram("Adapter registration from disk", results.cold_register, out_dir / "cold-register.png"),
        "warm switch": plot_histogram("Host to device slot copies (warm switch)", results.warm_switch, out_dir / "warm-switch.png"),
    }  # fmt: skip


def _compare_intro(results: SuiteResults) -> str:
    settings, top = results.settings, max(COMPARE_COUNTS)
    served = {run.server for run in results.compare}
    servers = ", ".join(server for server in SERVERS if server in served)
    peft = f"the PEFT baselines at N = {top} only" if settings.peft_baselines else "the PEFT baselines left out (`--no-peft`)"
    text = (
        f"Compare phase: {servers} started once and kept up side by side, each serving the same {top} adapters; "
        f"{settings.rounds} round(s), each running N ∈ {{{', '.join(map(str, COMPARE_COUNTS))}}} (power law, α = 1, one "
        f"seeded trace per round and N, the same for every server) against the servers in turn, their order reversed every "
        f"other round; {peft}; {settings.compare_requests} requests per run, outputs "
        f"{settings.compare_output_len[0]}–{settings.compare_output_len[1]} tokens. A ratio is taken within each round "
        "and the median of the rounds' ratios is reported."
    )
    if VLLM in served:
        return text + (
            f" vLLM runs `--enable-lora --max-loras {settings.max_loras} --max-cpu-loras {top}` for every N, so its "
            f"base-only (N = 0) figure is with LoRA enabled, as {LORAPLEX}'s is with its adapters loaded."
        )
    return text + " vLLM was left out of this run (no `--vllm-python`)."


def render_section(results: SuiteResults, plots: dict[str, Path], md_dir: Path) -> str:
    settings = results.settings
    marker = settings.section
    lines = [
        f"<!-- suite:{marker} -->",
        f"## {results.device}, model `{results.model_config}`",
        "",
        f"{datetime.date.today().isoformat()}: `python -m loadtest.suite --device {settings.device} --model-config "
        f"{settings.model_config}{'' if settings.peft_baselines else ' --no-peft'}` took {results.seconds / 60:.1f} min. "
        f"{settings.concurrency} closed-loop clients; "
        f"prompts {settings.prompt_len[0]}–{settings.prompt_len[1]} tokens; loraplex and vLLM with `--max-loras "
        f"{settings.max_loras}`, dtype {settings.dtype}"
        + (f"; every server with {settings.server_threads} torch thread(s)." if settings.device == "cpu" else "."),
        "",
        _compare_intro(results),
        "",
        *ratio_table(compare_ratios(results.compare)),
        "",
        *runs_table(results.compare),
        "",
        f"loraplex sweep: one server, the base only and N ∈ {{{', '.join(map(str, settings.adapter_counts))}}} at α ∈ {{0, 1}}, "
        f"{settings.requests} requests per run, outputs {settings.output_len[0]}–{settings.output_len[1]} tokens.",
        "",
        "| ratio | measured | goal | |",
        "|---|---|---|---|",
    ]
    for name, value, goal in measured_ratios(results):
        verdict = "–" if value is None else ("✓" if value >= goal else "✗")
        lines.append(f"| {name} | {_ratio(value)} | ≥ {goal:g} | {verdict} |")
    lines += ["", *_runs_table(results), "", "Adapter cold starts and warm switches:", "", *_adapter_latency(results), ""]
    for title, path in plots.items():
        lines.append(f"![{title}]({os.path.relpath(path, md_dir)})")
    lines += ["", f"<!-- /suite:{marker} -->"]
    return "\n".join(lines)


def replace_section(document: str, section: str, marker: str) -> str:
    """`document` with the section between `marker`'s comments replaced by `section`, or appended."""
    start, end = f"<!-- suite:{marker} -->", f"<!-- /suite:{marker} -->"
    if start in document and end in document:
        head, _, rest = document.partition(start)
        _, _, tail = rest.partition(end)
        return head + section + tail
    return document.rstrip("\n") + "\n\n" + section + "\n"


def print_ratios(results: SuiteResults) -> None:
    console = Console()
    compare = Table(title=f"loraplex suite, compare phase: {results.device}, {results.model_config}")
    for column in ("ratio", "median of rounds", "per round", "goal", ""):
        compare.add_column(column)
    for ratio in compare_ratios(results.compare):
        per_round = ", ".join(_ratio(value) for value in ratio.per_round)
        compare.add_row(ratio.name, _ratio(ratio.median), per_round, "–" if ratio.goal is None else str(ratio.goal), ratio.verdict)
    console.print(compare)
    sweep = Table(title=f"loraplex suite, loraplex sweep: {results.device}, {results.model_config}")
    for column in ("ratio", "measured", "goal"):
        sweep.add_column(column)
    for name, value, goal in measured_ratios(results):
        sweep.add_row(name, _ratio(value), f">= {goal:g}")
    console.print(sweep)


def write_section(results: SuiteResults, benchmarks_md: Path, out_dir: Path) -> None:
    """Print the ratios, draw the plots into `out_dir` and update `benchmarks_md`."""
    print_ratios(results)
    plots = draw_plots(results, out_dir)
    document = benchmarks_md.read_text() if benchmarks_md.exists() else HEADER
    section = render_section(results, plots, benchmarks_md.resolve().parent)
    benchmarks_md.write_text(replace_section(document, section, results.settings.section))

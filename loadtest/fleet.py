"""`python -m loadtest.fleet`: the adapter-fleet benchmark of issue 15, on servers started here on 127.0.0.1.

Owns: `FleetConfig`, the command line, and the order of a fleet run, for each model shape
(`--model-configs`, the suite's default shape and `small`):

    1. start-up (fleet_startup.py): stores of N in {1,000, 10,000} rank-16 adapters on all seven
       projections (a few written with peft/safetensors, the rest hard links to their files);
       for each, `loraplex serve` timed from the spawn to `/health` 200, the peak RSS of the
       server and of its engine process, and how many adapters `GET /v1/models` lists;
    2. fleet runs (fleet_load.py): N in {8, 512, 4,096} distinct adapters at alpha in {0, 1},
       each twice per round, all-resident (a host budget `--max-cpu-lora-bytes` of twice the N
       adapters' bytes) and budgeted (1/8 of them), the order alternating from round to round.
       A server without that flag skips this part with a message.

Every wait is bounded (`--startup-timeout`, `--max-seconds`, a request count), and a server whose
processes pass `--max-rss-gib` is killed and reported so (this machine has no swap). Results go to
`--out` (JSON) after every measurement, then the tables are printed, with a Markdown block for
BENCHMARKS.md (fleet_report.py).

    python -m loadtest.fleet                                        # everything, this CPU
    python -m loadtest.fleet --parts startup --store-sizes 200 --model-configs tiny
    python -m loadtest.fleet --parts fleet --adapter-counts 8,512 --rounds 1
"""

import argparse
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from loadtest.compare import round_order
from loadtest.fleet_load import VARIANTS, FlagRefused, FleetRun, budget_bytes, fleet_run
from loadtest.fleet_report import FleetResults, print_results
from loadtest.fleet_startup import OVER_MEMORY, READY, build_store, measure_startup
from loadtest.processes import available_memory
from loadtest.suite_config import ALPHAS, SuiteConfig
from loadtest.summary import format_ms, format_number
from loadtest.workspace import save_base

PARTS = ("startup", "fleet")
MEMORY_SHARE = 0.7  # of the memory available at the start: the default --max-rss-gib


@dataclass(frozen=True)
class FleetConfig:
    """Every setting of a fleet run; `python -m loadtest.fleet --help` shows them as flags.

    Args:
        suite: the servers' and the load's settings (device, rank, clients, requests per run,
            time bound per run, device slots, threads, seed); its `model_config` is replaced by each of `model_configs`.
        model_configs: the base shapes measured, each a `MODEL_PRESETS` name, a config.json path or inline JSON.
        parts: which of `PARTS` to run.
        store_sizes: N of the start-up part.
        adapter_counts: N of the fleet runs.
        alphas: popularity exponents of the fleet runs.
        rounds: rounds of the fleet runs (each variant once per round).
        budget_fraction: the budgeted host tier, as a share of the N adapters' bytes.
        startup_timeout: seconds a server may take to be ready (and the priming pass to end).
        max_rss_bytes: resident bytes of a server's processes together at which it is killed.
        distinct_adapters: adapters written per store; the rest hard-link their files.
        out: the JSON file.
    """

    suite: SuiteConfig = SuiteConfig(requests=256, max_seconds=60.0)
    model_configs: tuple[str, ...] = (SuiteConfig.model_config, "small")
    parts: tuple[str, ...] = PARTS
    store_sizes: tuple[int, ...] = (1000, 10000)
    adapter_counts: tuple[int, ...] = (8, 512, 4096)
    alphas: tuple[float, ...] = ALPHAS
    rounds: int = 2
    budget_fraction: float = 1 / 8
    startup_timeout: float = 900.0
    max_rss_bytes: int = 16 << 30
    distinct_adapters: int = 4
    out: Path = Path("benchmarks/fleet.json")


def machine(config: SuiteConfig) -> str:
    if config.device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads per server: {config.server_threads})"


def run_startup(config: FleetConfig, suite: SuiteConfig, base_dir: Path, base, root: Path, results: FleetResults) -> None:
    """The start-up part for one shape: a store per N, built, served once, removed."""
    for count in config.store_sizes:
        store = build_store(base, suite, root / f"store-{count}", count, config.distinct_adapters)
        results.stores.append(f"{suite.model_config}: {store.describe()}")
        print(results.stores[-1], flush=True)
        start = measure_startup(base_dir, store, suite, config.startup_timeout, config.max_rss_bytes)
        results.startup.append(start)
        if start.status == READY:
            print(f"  ready in {start.seconds:.1f} s, server {start.server_peak_rss / 2**20:,.0f} MiB, engine "
                  f"{(start.engine_peak_rss or 0) / 2**20:,.0f} MiB, {start.models_listed:,} of {count:,} listed", flush=True)  # fmt: skip
        else:
            bound = f" ({config.max_rss_bytes / 2**30:.1f} GiB)" if start.status == OVER_MEMORY else ""
            print(f"  {start.status}{bound} after {start.seconds:.0f} s; the server's log ends:\n{start.log}", flush=True)
        results.write(config.out)
        shutil.rmtree(store.path)


def run_fleet_shape(config: FleetConfig, suite: SuiteConfig, base_dir: Path, base, root: Path, results: FleetResults) -> None:
    """The fleet runs for one shape: per N a store of exactly N, per alpha `rounds` rounds of both variants.

    Raises:
        FlagRefused: the server predates the host budget.
    """
    for count in config.adapter_counts:
        store = build_store(base, suite, root / f"fleet-{count}", count, config.distinct_adapters)
        results.stores.append(f"{suite.model_config}: {store.describe()}")
        print(results.stores[-1], flush=True)
        for alpha in config.alphas:
            for round_index in range(config.rounds):
                for position, variant in enumerate(round_order(VARIANTS, round_index), start=1):
                    budget = budget_bytes(variant, store, config.budget_fraction)
                    run = FleetRun(suite.model_config, count, alpha, variant, round_index + 1, position, budget)
                    fleet_run(base_dir, store, suite, run, config.startup_timeout, config.max_rss_bytes)
                    results.runs.append(run)
                    results.write(config.out)
                    print(
                        f"  N={count} alpha={alpha:g} round {run.round} {variant} (host budget {budget / 2**20:,.1f} MiB): "
                        + (f"{format_number(run.output_tokens_per_s)} tok/s, TTFT p50 cold {format_ms(run.cold_ttft_p50)} ms "
                           f"({run.cold_requests}) / warm {format_ms(run.warm_ttft_p50)} ms ({run.warm_requests}); "
                           f"start-up {run.startup_seconds:.0f} s, priming {run.prime_seconds:.0f} s"
                           if run.status == "ok" else f"{run.status}\n{run.log}"),
                        flush=True,
                    )  # fmt: skip
        shutil.rmtree(store.path)


def run_benchmark(config: FleetConfig, workdir: Path | None = None) -> FleetResults:
    """Both parts for every shape; writes `config.out` as it goes and returns the results."""
    settings = {**asdict(config), "suite": asdict(config.suite)}
    results = FleetResults(machine=machine(config.suite), settings=settings)
    root = Path(tempfile.mkdtemp(prefix="loraplex-fleet-")) if workdir is None else workdir
    try:
        for shape in config.model_configs:
            suite = replace(config.suite, model_config=shape)
            base_dir = root / suite.section / "base"
            base = save_base(suite, base_dir)
            if "startup" in config.parts:
                run_startup(config, suite, base_dir, base, root / suite.section, results)
            if "fleet" in config.parts and results.fleet_skipped is None:
                try:
                    run_fleet_shape(config, suite, base_dir, base, root / suite.section, results)
                except FlagRefused as refused:
                    results.fleet_skipped = str(refused)
                    print(f"fleet runs skipped: {refused}; the server's log ends:\n{refused.log}", flush=True)
        results.write(config.out)
        return results
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _numbers(text: str, kind=int) -> tuple:
    return tuple(kind(item) for item in text.split(",") if item)


def parse_args(argv: list[str] | None) -> FleetConfig:
    defaults, suite = FleetConfig(), FleetConfig().suite
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-configs", default=",".join(defaults.model_configs), help="base shapes, comma-separated")
    parser.add_argument("--parts", default=",".join(defaults.parts), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--store-sizes", default=",".join(map(str, defaults.store_sizes)), help="N of the start-up part")
    parser.add_argument("--adapter-counts", default=",".join(map(str, defaults.adapter_counts)), help="N of the fleet runs")
    parser.add_argument("--alphas", default=",".join(f"{alpha:g}" for alpha in defaults.alphas), help="popularity exponents")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds of the fleet runs (each variant once a round)")
    parser.add_argument("--budget-fraction", type=float, default=defaults.budget_fraction, help="budgeted host tier / N adapters' bytes")
    parser.add_argument("--requests", type=int, default=suite.requests, help="requests per fleet run")
    parser.add_argument("--max-seconds", type=float, default=suite.max_seconds, help="time bound of each fleet run")
    parser.add_argument("--concurrency", type=int, default=suite.concurrency, help="closed-loop clients")
    parser.add_argument("--max-loras", type=int, default=suite.max_loras, help="device slots (--max-loras)")
    parser.add_argument("--startup-timeout", type=float, default=defaults.startup_timeout, help="seconds a server may take to be ready")
    parser.add_argument(
        "--max-rss-gib", type=float, default=None,
        help=f"kill a server whose processes together pass this (default {MEMORY_SHARE * 100:.0f}%% of the memory available now)",
    )  # fmt: skip
    parser.add_argument("--distinct-adapters", type=int, default=defaults.distinct_adapters, help="adapters written per store")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=suite.device)
    parser.add_argument("--server-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="torch threads per server on CPU")
    parser.add_argument("--seed", type=int, default=suite.seed)
    parser.add_argument("--out", type=Path, default=defaults.out, help="the JSON results")
    args = parser.parse_args(argv)
    parts = tuple(part for part in args.parts.split(",") if part)
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}")
    counts = {"--store-sizes": _numbers(args.store_sizes), "--adapter-counts": _numbers(args.adapter_counts)}
    for flag, values in counts.items():
        if not values or min(values) < 1:
            parser.error(f"{flag} takes positive counts")
    if args.rounds < 1 or args.distinct_adapters < 1 or not 0 < args.budget_fraction <= 1:
        parser.error("--rounds and --distinct-adapters must be at least 1, --budget-fraction in (0, 1]")
    max_rss = int(args.max_rss_gib * 2**30) if args.max_rss_gib is not None else int(MEMORY_SHARE * available_memory())
    return FleetConfig(
        suite=replace(suite, device=args.device, concurrency=args.concurrency, requests=args.requests, max_seconds=args.max_seconds,
                      max_loras=args.max_loras, server_threads=args.server_threads, seed=args.seed),
        model_configs=tuple(args.model_configs.split(",")), parts=parts, store_sizes=counts["--store-sizes"],
        adapter_counts=counts["--adapter-counts"], alphas=_numbers(args.alphas, float), rounds=args.rounds,
        budget_fraction=args.budget_fraction, startup_timeout=args.startup_timeout, max_rss_bytes=max_rss,
        distinct_adapters=args.distinct_adapters, out=args.out,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> FleetResults:
    config = parse_args(argv)
    results = run_benchmark(config)
    print_results(results)
    print(f"results: {config.out}")
    return results


if __name__ == "__main__":
    main()

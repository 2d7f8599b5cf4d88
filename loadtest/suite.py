"""`python -m loadtest.suite`: the benchmark sweep behind BENCHMARKS.md.

Owns: the sweep, every part of it against servers started here on 127.0.0.1 from one random
checkpoint, one adapter store and one seeded trace family:

    1. loraplex, base model only;
    2. loraplex with N in {1, 8, 64, 512} adapters at alpha in {0, 1};
    3. loraplex, PEFT naive and PEFT mixed-batch on one identical trace over 64 adapters;
    4. cold starts: adapters registered from disk one by one (`/v1/load_lora_adapter`) and each
       asked for one token, timed by the client and by the server's histograms; warm switches
       (host to device slot copies) from the server's histograms over the sweep.

Every run is closed loop (C clients), bounded by a request count and a time limit. The ratios
and the figures go to a section of BENCHMARKS.md (report.py) and plots to `--out`.

    python -m loadtest.suite                                   # this CPU, tiny model
    python -m loadtest.suite --device cuda --model-config llama-3.2-1b
"""

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import torch

from loadtest.checkpoints import make_random_adapters, model_config, save_random_model
from loadtest.client import ClientConfig
from loadtest.report import SuiteResults, write_section
from loadtest.run import LoadRun, execute
from loadtest.servers import ServerProcess, baseline_args, free_port, histogram_delta, loraplex_args, scrape_histogram
from loadtest.trace import TraceConfig

ADAPTER_COUNTS = (1, 8, 64, 512)
ALPHAS = (0.0, 1.0)
COMPARE_ADAPTERS = 64
REGISTER = "loraplex_adapter_register_seconds"
SLOT_LOAD = "loraplex_adapter_load_seconds"


@dataclass(frozen=True)
class SuiteConfig:
    model_config: str = "tiny"
    device: str = "cpu"
    rank: int = 16
    concurrency: int = 32
    requests: int = 384
    compare_requests: int = 96
    cold_adapters: int = 32
    prompt_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (16, 64)
    max_seconds: float = 240.0
    max_loras: int = 32
    server_threads: int = 1
    seed: int = 0
    adapter_counts: tuple[int, ...] = ADAPTER_COUNTS
    out: Path = Path("benchmarks")
    benchmarks_md: Path = Path("BENCHMARKS.md")

    @property
    def server_env(self) -> dict[str, str]:
        """Every server gets the same torch intra-op threads, so the load generator keeps a core."""
        return {"OMP_NUM_THREADS": str(self.server_threads)} if self.device == "cpu" else {}

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def section(self) -> str:
        return f"{self.device}-{self.model_config}" if len(self.model_config) < 40 else f"{self.device}-custom"


@dataclass
class Workspace:
    """The checkpoint and adapter directories of one sweep."""

    root: Path
    model: Path = field(init=False)
    store: Path = field(init=False)  # every sweep adapter: what loraplex serves
    compare: Path = field(init=False)  # links to the first 64: what the baselines load
    cold: Path = field(init=False)  # adapters loraplex has never seen, for cold starts

    def __post_init__(self):
        self.model, self.store = self.root / "base", self.root / "store"
        self.compare, self.cold = self.root / "compare", self.root / "cold"


def build_workspace(config: SuiteConfig, root: Path) -> Workspace:
    space = Workspace(root)
    max_positions = config.prompt_len[1] + config.output_len[1] + 16
    base = model_config(config.model_config, max_positions)
    save_random_model(space.model, base, getattr(torch, config.dtype), config.seed)
    print(f"building {max(config.adapter_counts)} rank-{config.rank} adapters ...", flush=True)
    dtype = getattr(torch, config.dtype)
    names = make_random_adapters(base, space.store, max(config.adapter_counts), config.rank, seed=config.seed, dtype=dtype)
    space.compare.mkdir()
    for name in list(names)[:COMPARE_ADAPTERS]:
        (space.compare / name).symlink_to(names[name], target_is_directory=True)
    make_random_adapters(base, space.cold, config.cold_adapters, config.rank, prefix="cold-", seed=config.seed + 1, dtype=dtype)
    return space


def trace(config: SuiteConfig, num_adapters: int, alpha: float, requests: int) -> TraceConfig:
    return TraceConfig(
        num_requests=requests,
        adapters=tuple(f"lora-{index}" for index in range(num_adapters)),
        alpha=alpha,
        prompt_len=config.prompt_len,
        output_len=config.output_len,
        token_ids=(10, 256),
        seed=config.seed,
    )


def measure(config: SuiteConfig, url: str, label: str, workload: TraceConfig, results: SuiteResults) -> None:
    load = LoadRun(label, workload, ClientConfig(url), config.concurrency, config.max_seconds, config.out / "runs")
    results.runs[label], _ = execute(load)


def warm_up(config: SuiteConfig, url: str) -> None:
    """First calls pay for allocator growth and lazy initialisation; keep them out of the figures."""
    workload = replace(trace(config, 8, 0.0, 2 * config.concurrency), output_len=(4, 8), seed=config.seed + 99)
    execute(LoadRun("warm-up", workload, ClientConfig(url), config.concurrency, config.max_seconds, quiet=True))


def cold_starts(config: SuiteConfig, url: str, space: Workspace, results: SuiteResults) -> None:
    """Register never-seen adapters from disk one at a time and time each one's first token."""
    before = {REGISTER: scrape_histogram(url, REGISTER, source="path"), SLOT_LOAD: scrape_histogram(url, SLOT_LOAD)}
    with httpx.Client(base_url=url, timeout=120) as client:
        for index in range(config.cold_adapters):
            name = f"cold-{index}"
            started = time.perf_counter()
            response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(space.cold / name)})
            response.raise_for_status()
            registered = time.perf_counter()
            body = {"model": name, "prompt": [11, 12, 13, 14], "max_tokens": 1, "temperature": 0.0}
            client.post("/v1/completions", json=body).raise_for_status()
            results.cold_client.append((registered - started, time.perf_counter() - started))
    results.cold_register = histogram_delta(before[REGISTER], scrape_histogram(url, REGISTER, source="path"))
    results.cold_slot = histogram_delta(before[SLOT_LOAD], scrape_histogram(url, SLOT_LOAD))


def check_served(url: str, wanted: int) -> None:
    """Refuse to measure a server that did not take every adapter: its runs would be 404s."""
    served = {model["id"] for model in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
    missing = [f"lora-{index}" for index in range(wanted) if f"lora-{index}" not in served]
    if missing:
        raise RuntimeError(f"the server does not serve {len(missing)} of the adapters, e.g. {missing[:3]}; see its log")


def run_loraplex(config: SuiteConfig, space: Workspace, results: SuiteResults) -> None:
    port = free_port()
    args = loraplex_args(space.model, space.store, port, config.device, config.dtype, config.max_loras, config.concurrency)
    args += ["--lora-roots", str(space.cold)]
    with ServerProcess("loraplex", args, port, config.server_env) as server:
        check_served(server.url, max(config.adapter_counts))
        warm_up(config, server.url)
        slot_loads_before = scrape_histogram(server.url, SLOT_LOAD)
        measure(config, server.url, "loraplex base only", trace(config, 0, 0.0, config.requests), results)
        for count in config.adapter_counts:
            for alpha in ALPHAS:
                label = f"loraplex N={count} alpha={alpha:g}"
                measure(config, server.url, label, trace(config, count, alpha, config.requests), results)
        results.warm_switch = histogram_delta(slot_loads_before, scrape_histogram(server.url, SLOT_LOAD))
        compare = trace(config, COMPARE_ADAPTERS, 1.0, config.compare_requests)
        measure(config, server.url, f"loraplex N={COMPARE_ADAPTERS} (compare)", compare, results)
        cold_starts(config, server.url, space, results)


def run_baselines(config: SuiteConfig, space: Workspace, results: SuiteResults) -> None:
    compare = trace(config, COMPARE_ADAPTERS, 1.0, config.compare_requests)
    for kind in ("naive", "mixed"):
        port = free_port()
        args = baseline_args(kind, space.model, space.compare, port, config.device, config.dtype, config.concurrency)
        with ServerProcess(f"peft-{kind}", args, port, config.server_env) as server:
            check_served(server.url, COMPARE_ADAPTERS)
            warm_up(config, server.url)
            measure(config, server.url, f"PEFT {kind} N={COMPARE_ADAPTERS} (compare)", compare, results)


def run_suite(config: SuiteConfig, workdir: Path | None = None) -> SuiteResults:
    """Run the whole sweep, write the BENCHMARKS.md section and plots; returns the results."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="loraplex-suite-")) if workdir is None else workdir
    try:
        space = build_workspace(config, root)
        results = SuiteResults(
            device=torch.cuda.get_device_name() if config.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            model_config=config.model_config,
            settings=config,
        )
        run_loraplex(config, space, results)
        run_baselines(config, space, results)
        results.seconds = time.monotonic() - started
        write_section(results, config.benchmarks_md, config.out)
        return results
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None) -> SuiteConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SuiteConfig()
    parser.add_argument("--model-config", default=defaults.model_config, help="preset name, config.json path or inline JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="closed-loop clients")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests per loraplex run")
    parser.add_argument("--compare-requests", type=int, default=defaults.compare_requests, help="requests of the 3-server run")
    parser.add_argument("--cold-adapters", type=int, default=defaults.cold_adapters)
    parser.add_argument("--adapter-counts", default=",".join(map(str, defaults.adapter_counts)))
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="time bound of each run")
    parser.add_argument("--max-loras", type=int, default=defaults.max_loras)
    parser.add_argument(
        "--server-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads of each server on CPU (default: all cores but one, which the load generator uses)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=defaults.out, help="plots and per-run files")
    parser.add_argument("--benchmarks-md", type=Path, default=defaults.benchmarks_md)
    args = parser.parse_args(argv)
    counts = tuple(int(count) for count in args.adapter_counts.split(","))
    if COMPARE_ADAPTERS > max(counts):
        parser.error(f"--adapter-counts must reach {COMPARE_ADAPTERS}: the baselines are compared there")
    return SuiteConfig(
        model_config=args.model_config, device=args.device, rank=args.rank, concurrency=args.concurrency,
        requests=args.requests, compare_requests=args.compare_requests, cold_adapters=args.cold_adapters,
        max_seconds=args.max_seconds, max_loras=args.max_loras, server_threads=args.server_threads, seed=args.seed,
        adapter_counts=counts,
        out=args.out / SuiteConfig(model_config=args.model_config, device=args.device).section,
        benchmarks_md=args.benchmarks_md,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> SuiteResults:
    return run_suite(parse_args(argv))


if __name__ == "__main__":
    main()

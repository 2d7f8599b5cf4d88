"""`python -m loadtest.suite`: the benchmark sweep behind BENCHMARKS.md.

Owns: the command line and the order of a suite run, against servers started here on 127.0.0.1
from one random checkpoint and one adapter store (workspace.py):

    1. the compare phase (compare.py): loraplex, vLLM (with `--vllm-python`, from its own
       virtualenv) and PEFT naive and mixed-batch, all up side by side, measured in rounds at
       N in {0, 8, 64} adapters on one seeded trace per round, the server order alternating;
    2. the loraplex sweep: one loraplex, base model only, then N in {1, 8, 64, 512} adapters at
       alpha in {0, 1};
    3. cold starts on that loraplex: adapters registered from disk one by one
       (`/v1/load_lora_adapter`) and each asked for one token, timed by the client and by the
       server's histograms; warm switches (host to device slot copies) from the server's
       histograms over the sweep.

Every run is closed loop (C clients), bounded by a request count and a time limit. The ratios
and the figures go to a section of BENCHMARKS.md (report.py) and plots to `--out`. vLLM's
virtualenv is checked before anything is built, so a broken one fails at once.

    python -m loadtest.suite                                   # this CPU, tiny model
    python -m loadtest.suite --vllm-python .vllm-venv/bin/python    # with vLLM (loadtest/vllm_venv.sh)
    python -m loadtest.suite --device cuda --model-config llama-3.2-1b
"""

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import torch

from loadtest.compare import run_compare
from loadtest.measure import check_served, measure, warm_up
from loadtest.report import SuiteResults, write_section
from loadtest.servers import ServerProcess, free_port, histogram_delta, loraplex_args, scrape_histogram
from loadtest.suite_config import ALPHAS, SuiteConfig
from loadtest.vllm_server import VllmSetupError, vllm_launch
from loadtest.workspace import Workspace, build_workspace

REGISTER = "loraplex_adapter_register_seconds"
SLOT_LOAD = "loraplex_adapter_load_seconds"


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


def run_sweep(config: SuiteConfig, space: Workspace, results: SuiteResults) -> None:
    """The loraplex sweep and the cold starts, on one loraplex serving the whole store."""
    port = free_port()
    args = loraplex_args(space.model, space.store, port, config.device, config.dtype, config.max_loras, config.concurrency)
    args += ["--lora-roots", str(space.cold)]
    with ServerProcess("loraplex", args, port, config.server_env) as server:
        check_served(server.url, max(config.adapter_counts))
        warm_up(config, server.url)
        slot_loads_before = scrape_histogram(server.url, SLOT_LOAD)
        results.runs["loraplex base only"] = measure(config, server.url, "loraplex base only", config.trace(0, 0.0, config.requests))
        for count in config.adapter_counts:
            for alpha in ALPHAS:
                label = f"loraplex N={count} alpha={alpha:g}"
                results.runs[label] = measure(config, server.url, label, config.trace(count, alpha, config.requests))
        results.warm_switch = histogram_delta(slot_loads_before, scrape_histogram(server.url, SLOT_LOAD))
        cold_starts(config, server.url, space, results)


def run_suite(config: SuiteConfig, workdir: Path | None = None) -> SuiteResults:
    """Run the whole suite, write the BENCHMARKS.md section and plots; returns the results.

    Raises:
        VllmSetupError: `config.vllm_python` is set and cannot run vLLM (checked first).
    """
    started = time.monotonic()
    vllm = None
    if config.vllm_python is not None:
        vllm = vllm_launch(config.vllm_python, config.device, config.server_threads, config.vllm_kv_cache_gib)
    root = Path(tempfile.mkdtemp(prefix="loraplex-suite-")) if workdir is None else workdir
    try:
        space = build_workspace(config, root)
        results = SuiteResults(
            device=torch.cuda.get_device_name() if config.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            model_config=config.model_config,
            settings=config,
        )
        results.compare = run_compare(config, space, vllm)
        run_sweep(config, space, results)
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
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests per run of the loraplex sweep")
    parser.add_argument("--compare-requests", type=int, default=defaults.compare_requests, help="requests per run of the compare phase")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds of the compare phase (at least 1)")
    parser.add_argument(
        "--vllm-python", type=Path, default=None,
        help="python of the vLLM virtualenv (bash loadtest/vllm_venv.sh builds one); without it vLLM is left out",
    )
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=defaults.vllm_kv_cache_gib, help="vLLM's CPU KV cache")
    parser.add_argument(
        "--vllm-gpu-memory", type=float, default=defaults.vllm_gpu_memory,
        help="vLLM's --gpu-memory-utilization with --device cuda (the GPU is shared with the other servers)",
    )
    parser.add_argument(
        "--no-peft", action="store_true", help="leave the PEFT baselines out of the compare phase (slow on a large base)"
    )
    parser.add_argument("--cold-adapters", type=int, default=defaults.cold_adapters)
    parser.add_argument("--adapter-counts", default=",".join(map(str, defaults.adapter_counts)), help="N of the loraplex sweep")
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
    if min(counts) < 1:
        parser.error("--adapter-counts must be positive (the sweep runs the base only anyway)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return SuiteConfig(
        model_config=args.model_config, device=args.device, rank=args.rank, concurrency=args.concurrency,
        requests=args.requests, compare_requests=args.compare_requests, rounds=args.rounds, cold_adapters=args.cold_adapters,
        max_seconds=args.max_seconds, max_loras=args.max_loras, server_threads=args.server_threads, seed=args.seed,
        adapter_counts=counts, vllm_python=args.vllm_python, vllm_kv_cache_gib=args.vllm_kv_cache_gib,
        vllm_gpu_memory=args.vllm_gpu_memory, peft_baselines=not args.no_peft,
        out=args.out / SuiteConfig(model_config=args.model_config, device=args.device).section,
        benchmarks_md=args.benchmarks_md,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> SuiteResults:
    try:
        return run_suite(parse_args(argv))
    except VllmSetupError as error:
        raise SystemExit(f"loadtest.suite: {error}") from error


if __name__ == "__main__":
    main()

"""The suite's compare phase: loraplex, vLLM and the PEFT baselines side by side, in rounds.

Owns: `CompareServer` (one kind of server: its name, command, interpreter, environment and the
adapter counts it is measured at), the servers of a suite run, the order they run in each round
(`round_order`: reversed every other round, so no server always goes first), and `run_compare`.
That starts every server once, all at the same time, and keeps them up side by side, each serving
the same `max(COMPARE_COUNTS)` adapters (LoRA on whatever N a run asks for, as in production);
warms each up; then in every round, for each N in `COMPARE_COUNTS`, runs one seeded trace
(power-law popularity, alpha = 1; a new seed each round) against each server in the round's
order. The PEFT baselines run at the largest N only. It must not compute ratios or write the
report (rounds.py and report.py do).
"""

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from loadtest.measure import check_served, measure, warm_up
from loadtest.rounds import LORAPLEX, PEFT_MIXED, PEFT_NAIVE, VLLM, RoundRun
from loadtest.servers import ServerProcess, baseline_args, free_port, loraplex_args
from loadtest.suite_config import COMPARE_ALPHA, COMPARE_COUNTS, SuiteConfig
from loadtest.vllm_server import VllmLaunch, vllm_args
from loadtest.workspace import Workspace

T = TypeVar("T")


@dataclass(frozen=True)
class CompareServer:
    """One server of the compare phase.

    Args:
        name: its name in the report (`loraplex`, `vLLM`, `PEFT naive`, `PEFT mixed`).
        args: its arguments after `python -m`.
        port: where those arguments make it listen.
        counts: the N it is measured at.
        env: environment variables added to the suite's.
        python: the interpreter that runs it.
    """

    name: str
    args: list[str]
    port: int
    counts: tuple[int, ...] = COMPARE_COUNTS
    env: dict[str, str] = field(default_factory=dict)
    python: Path | str = sys.executable


def round_order(servers: Sequence[T], round_index: int) -> list[T]:
    """The order servers run in within round `round_index` (0-based): as given, reversed in odd rounds."""
    return list(servers) if round_index % 2 == 0 else list(reversed(servers))


def compare_servers(config: SuiteConfig, space: Workspace, vllm: VllmLaunch | None) -> list[CompareServer]:
    """loraplex, vLLM (when `vllm` is given) and the two PEFT baselines, over the compare adapters."""
    device, dtype, top = config.device, config.dtype, max(COMPARE_COUNTS)
    port = free_port()
    servers = [
        CompareServer(LORAPLEX, loraplex_args(space.model, space.compare, port, device, dtype, config.max_loras, config.concurrency), port)
    ]
    if vllm is not None:
        port = free_port()
        args = vllm_args(
            space.model, space.compare_adapters(), port, dtype, config.max_positions, config.concurrency, config.max_loras,
            config.rank, gpu_memory=config.vllm_gpu_memory if device == "cuda" else None,
        )  # fmt: skip
        servers.append(CompareServer(VLLM, args, port, env=vllm.env, python=vllm.python))
    for kind, name in (("naive", PEFT_NAIVE), ("mixed", PEFT_MIXED)) if config.peft_baselines else ():
        port = free_port()
        args = baseline_args(kind, space.model, space.compare, port, device, dtype, config.concurrency)
        servers.append(CompareServer(name, args, port, counts=(top,)))
    return servers


def _start(stack: ExitStack, config: SuiteConfig, server: CompareServer) -> ServerProcess:
    env = {**config.server_env, **server.env}
    process = ServerProcess(server.name, server.args, server.port, env, python=server.python)
    stack.callback(process.stop)
    return process


def run_compare(config: SuiteConfig, space: Workspace, vllm: VllmLaunch | None) -> list[RoundRun]:
    """Start the compare phase's servers, run its rounds, stop the servers; one `RoundRun` per run."""
    servers = compare_servers(config, space, vllm)
    top = max(COMPARE_COUNTS)
    runs = []
    with ExitStack() as stack:
        processes = {server.name: _start(stack, config, server) for server in servers}  # all start at once
        for server in servers:
            process = processes[server.name]
            process.wait_ready()
            check_served(process.url, top)
            print(f"{server.name} is up on {process.url}; warming it up", flush=True)
            warm_up(config, process.url)
        for round_index in range(config.rounds):
            order = round_order(servers, round_index)
            for count in COMPARE_COUNTS:
                workload = config.trace(count, COMPARE_ALPHA, config.compare_requests, seed=round_index, compare=True)
                for position, server in enumerate([server for server in order if count in server.counts], start=1):
                    label = f"{server.name} N={count} round {round_index + 1}"
                    summary = measure(config, processes[server.name].url, label, workload)
                    runs.append(RoundRun(server.name, count, round_index + 1, position, summary))
    return runs

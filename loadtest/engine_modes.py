"""The engine in its own process against the engine on a server thread: one A/B, same trace.

Owns: `python -m loadtest.engine_modes`, which builds (or reuses) a suite workspace of one preset,
starts two `loraplex serve` processes over the same adapters, one with the default
`--engine-process` and one with `--no-engine-process`, warms both up, then in alternating rounds
(the order reversed every other round) runs the suite's seeded compare trace at each N against
both, and prints every run and the median of the per-round ratios (process / thread) of output
tokens/s, TTFT p50 and ITL p50. It reuses the suite's pieces (workspace, servers, measure) and
must not write BENCHMARKS.md.
"""

import statistics
from contextlib import ExitStack
from pathlib import Path

import typer

from loadtest.measure import measure, warm_up
from loadtest.servers import ServerProcess, free_port, loraplex_args
from loadtest.suite_config import SuiteConfig
from loadtest.workspace import Workspace, build_workspace

MODES = {"process": [], "thread": ["--no-engine-process"]}


def main(
    model_config: str = typer.Option("tiny", help="Preset name, config.json path or inline JSON."),
    adapter_counts: str = typer.Option("0,8", help="N of the runs, comma-separated."),
    rounds: int = typer.Option(3, min=1, max=20, help="Alternating rounds."),
    requests: int = typer.Option(128, min=1, max=10_000, help="Requests per run."),
    concurrency: int = typer.Option(32, min=1, max=1024, help="Closed-loop clients."),
    workspace: Path | None = typer.Option(
        None, help="Where the checkpoint and adapters go (default: /tmp/loraplex-engine-modes-<preset>); reused when present."
    ),
) -> None:
    workspace = workspace or Path(f"/tmp/loraplex-engine-modes-{model_config}")
    counts = [int(n) for n in adapter_counts.split(",")]
    config = SuiteConfig(
        model_config=model_config, concurrency=concurrency, compare_requests=requests, cold_adapters=0,
        out=workspace / "out",
    )  # fmt: skip
    space = Workspace(workspace) if (workspace / "base").exists() else build_workspace(config, workspace)
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {(m, n): [] for m in MODES for n in counts}
    with ExitStack() as stack:
        servers = {}
        for mode, extra in MODES.items():
            port = free_port()
            args = loraplex_args(space.model, space.compare, port, "cpu", config.dtype, config.max_loras, concurrency) + extra
            servers[mode] = stack.enter_context(ServerProcess(f"loraplex-{mode}", args, port, env=config.server_env))
        for server in servers.values():
            warm_up(config, server.url)
        for round_index in range(rounds):
            order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
            for n in counts:
                trace = config.trace(n, 1.0, requests, seed=round_index, compare=True)
                for mode in order:
                    summary = measure(config, servers[mode].url, f"{mode}-n{n}-round{round_index + 1}", trace)
                    row = (summary.output_tokens_per_s, summary.ttft.p50, summary.itl.p50)
                    results[(mode, n)].append(row)
                    print(f"{mode:>7} N={n:<3} round {round_index + 1}: {row[0]:7.0f} tok/s, TTFT p50 {row[1] * 1e3:6.1f} ms, "
                          f"ITL p50 {row[2] * 1e3:5.2f} ms, {summary.ok}/{summary.requests} ok", flush=True)  # fmt: skip
    for n in counts:
        pairs = list(zip(results[("process", n)], results[("thread", n)], strict=True))
        medians = [statistics.median(p[i] / t[i] for p, t in pairs) for i in range(3)]
        per_round = ", ".join(f"{p[0] / t[0]:.2f}" for p, t in pairs)
        print(f"N={n}: process / thread tok/s {medians[0]:.2f} (rounds {per_round}), TTFT p50 {medians[1]:.2f}, ITL p50 {medians[2]:.2f}")


if __name__ == "__main__":
    typer.run(main)

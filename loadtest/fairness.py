"""`python -m loadtest.fairness`: does a light tenant keep its latency while a heavy one floods the server?

Owns: the tenant-fairness benchmark and its target: two tenants, one sending ten times the other's
rate; the light tenant's TTFT p99 stays within 2x of its TTFT p99 when alone, and the heavy tenant
still uses the spare capacity. Per scheduling policy (`loraplex serve --scheduling fair|fcfs`), one
server on 127.0.0.1 with a keys file of two tenants, `light` and `heavy`, each calling its own
shared adapter of a random tiny store (checkpoints.py), and four runs, each bounded in requests
and seconds:

    1. warm-up: a few requests of each tenant, unmeasured;
    2. capacity: the heavy tenant alone, closed loop with `--max-num-seqs` clients: what the
       server can generate, in output tokens/s;
    3. alone: the light tenant alone, open loop, Poisson arrivals at `--light-rate` R;
    4. together: the light tenant at R and the heavy one at `--heavy-factor` x R (which saturates
       the server), at once, over the same span.

It prints one row per policy: the light tenant's TTFT p50/p99 alone and together, their p99 ratio,
the heavy tenant's output tokens/s together against the capacity, and pass/fail against the 2x
target. With the defaults on a 2-core CPU a policy takes about three minutes; first-come,
first-served (the scheduler before fair scheduling) measured a light p99 of 148 ms alone and 29 s
together (197x), the heavy tenant at 92% of capacity. Drives load through run.py; it must not
start servers other than loraplex, nor write anything outside its temporary directory.

    python -m loadtest.fairness                          # both policies, this CPU, tiny model
    python -m loadtest.fairness --policies fair --light-rate 2
"""

import argparse
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loadtest.checkpoints import make_random_adapters, model_config, save_random_model
from loadtest.client import ClientConfig
from loadtest.run import LoadRun, execute
from loadtest.servers import ServerProcess, free_port, loraplex_args
from loadtest.summary import Summary, format_ms, format_number
from loadtest.trace import TraceConfig

POLICIES = ("fair", "fcfs")
TENANTS = {"light": "sk-fairness-light-0001", "heavy": "sk-fairness-heavy-0001"}  # tenant -> its key
ADAPTERS = {"light": "lora-0", "heavy": "lora-1"}  # tenant -> the shared adapter it calls
TARGET_RATIO = 2.0  # light TTFT p99 together / alone


@dataclass(frozen=True)
class FairnessConfig:
    """Every setting of a fairness run; `python -m loadtest.fairness --help` shows them as flags.

    Args:
        policies: the `--scheduling` policies to compare, one server each.
        model_config: a `MODEL_PRESETS` name, a config.json path or inline JSON.
        device: `cpu` or `cuda`.
        rank: the adapters' LoRA rank.
        light_rate: R, the light tenant's mean requests per second (Poisson).
        heavy_factor: the heavy tenant sends at this many times R in the together run.
        light_requests: the light tenant's requests per open-loop run (the heavy one sends
            `heavy_factor` times as many, so both span about `light_requests / R` seconds).
        capacity_requests: requests of the closed-loop capacity run.
        max_num_seqs: the server's `--max-num-seqs`, and the capacity run's clients.
        prompt_len: (min, max) prompt tokens.
        output_len: (min, max) output tokens.
        max_seconds: the time bound of each run.
        server_threads: torch / OpenMP threads of the server on a CPU.
        seed: seeds the checkpoint, the adapters and every trace.
    """

    policies: tuple[str, ...] = POLICIES
    model_config: str = "tiny"
    device: str = "cpu"
    rank: int = 8
    light_rate: float = 1.5  # the tiny model on 2 CPU cores serves about 9 req/s: light alone is ~15% of it, heavy 1.6x
    heavy_factor: float = 10.0
    light_requests: int = 60  # 40 s a run at 1.5 req/s
    capacity_requests: int = 160
    max_num_seqs: int = 16
    prompt_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (32, 64)
    max_seconds: float = 90.0
    server_threads: int = max(1, (os.cpu_count() or 2) - 1)  # all cores but one, which the load generator uses
    seed: int = 0

    def __post_init__(self):
        if not self.policies or any(policy not in POLICIES for policy in self.policies):
            raise ValueError(f"policies must be some of {', '.join(POLICIES)}, got {','.join(self.policies)!r}")
        if self.light_rate <= 0 or self.heavy_factor <= 0 or self.max_seconds <= 0:
            raise ValueError("the light rate, the heavy factor and max_seconds must be positive")
        for name in ("light_requests", "capacity_requests", "max_num_seqs", "rank", "server_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        self.trace("light", 1, None, 0)  # refuses bad prompt and output ranges now, not mid-run

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    def trace(self, tenant: str, requests: int, rate: float | None, seed: int) -> TraceConfig:
        """`requests` of `tenant` to its adapter; `rate` None for a closed loop."""
        return TraceConfig(
            num_requests=requests, adapters=(ADAPTERS[tenant],), rate=rate, prompt_len=self.prompt_len,
            output_len=self.output_len, token_ids=(10, 256), seed=self.seed + seed,
        )  # fmt: skip


@dataclass
class PolicyResult:
    """What one policy's server measured."""

    policy: str
    capacity: Summary
    light_alone: Summary
    light_together: Summary
    heavy_together: Summary

    @property
    def ratio(self) -> float | None:
        alone, together = self.light_alone.ttft.p99, self.light_together.ttft.p99
        return together / alone if alone and together is not None else None

    @property
    def passed(self) -> bool:
        light_ok = not self.light_alone.errors and not self.light_together.errors
        return light_ok and self.ratio is not None and self.ratio <= TARGET_RATIO

    @property
    def heavy_share(self) -> float | None:
        """The heavy tenant's output tokens/s together over the server's capacity."""
        heavy, capacity = self.heavy_together.output_tokens_per_s, self.capacity.output_tokens_per_s
        return heavy / capacity if heavy is not None and capacity else None


def write_keys(path: Path) -> Path:
    """A keys file giving each of TENANTS one tenant key."""
    tables = [f'[[keys]]\nkey = "{key}"\ntenant = "{tenant}"\nrole = "tenant"\n' for tenant, key in TENANTS.items()]
    path.write_text("\n".join(tables))
    return path


def build_checkpoint(config: FairnessConfig, root: Path) -> tuple[Path, Path]:
    """The random base and a store of one shared adapter per tenant under `root`; (model, store)."""
    base = model_config(config.model_config, config.prompt_len[1] + config.output_len[1] + 16)
    dtype = getattr(torch, config.dtype)
    model, store = root / "base", root / "store"
    save_random_model(model, base, dtype, config.seed)
    make_random_adapters(base, store, len(ADAPTERS), config.rank, seed=config.seed, dtype=dtype)
    return model, store


def server_args(config: FairnessConfig, model: Path, store: Path, keys: Path, port: int, policy: str) -> list[str]:
    args = loraplex_args(model, store, port, config.device, config.dtype, len(ADAPTERS), config.max_num_seqs)
    return args + ["--api-keys", str(keys), "--scheduling", policy]


def client(url: str, tenant: str) -> ClientConfig:
    return ClientConfig(url, api_key=TENANTS[tenant])


def run_open(config: FairnessConfig, url: str, label: str, tenant: str, requests: int, rate: float, seed: int) -> Summary:
    load = LoadRun(label, config.trace(tenant, requests, rate, seed), client(url, tenant), max_seconds=config.max_seconds, quiet=True)
    summary, _ = execute(load)
    return summary


def measure_policy(config: FairnessConfig, url: str, policy: str) -> PolicyResult:
    """The four runs against one started server."""
    for tenant in TENANTS:
        warm = LoadRun("warm-up", config.trace(tenant, 8, None, 99), client(url, tenant), concurrency=4, max_seconds=60, quiet=True)
        execute(warm)
    print(f"[{policy}] capacity: the heavy tenant alone, {config.max_num_seqs} clients ...", flush=True)
    capacity = LoadRun(
        f"{policy} capacity", config.trace("heavy", config.capacity_requests, None, 1), client(url, "heavy"),
        concurrency=config.max_num_seqs, max_seconds=config.max_seconds, quiet=True,
    )  # fmt: skip
    capacity_summary, _ = execute(capacity)
    rate, heavy_rate = config.light_rate, config.light_rate * config.heavy_factor
    heavy_requests = round(config.light_requests * config.heavy_factor)
    print(f"[{policy}] alone: the light tenant at {rate:g} req/s ...", flush=True)
    alone = run_open(config, url, f"{policy} light alone", "light", config.light_requests, rate, 2)
    print(f"[{policy}] together: light at {rate:g} req/s, heavy at {heavy_rate:g} req/s ...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:  # each run has its own event loop
        light = pool.submit(run_open, config, url, f"{policy} light together", "light", config.light_requests, rate, 2)
        heavy = pool.submit(run_open, config, url, f"{policy} heavy together", "heavy", heavy_requests, heavy_rate, 3)
        together, heavy_together = light.result(), heavy.result()
    return PolicyResult(policy, capacity_summary, alone, together, heavy_together)


def errors(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in counts.items())


def table(results: list[PolicyResult]) -> str:
    header = [
        "policy", "light TTFT p50 alone", "p99 alone", "p50 together", "p99 together", "p99 together / alone",
        "heavy tok/s together", "capacity tok/s", "heavy share", f"p99 within {TARGET_RATIO:g}x",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        row = [
            result.policy, format_ms(result.light_alone.ttft.p50), format_ms(result.light_alone.ttft.p99),
            format_ms(result.light_together.ttft.p50), format_ms(result.light_together.ttft.p99),
            "-" if result.ratio is None else f"{result.ratio:.2f}x",
            format_number(result.heavy_together.output_tokens_per_s), format_number(result.capacity.output_tokens_per_s),
            "-" if result.heavy_share is None else f"{result.heavy_share:.0%}", "pass" if result.passed else "FAIL",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    for result in results:
        runs = {"capacity": result.capacity, "light alone": result.light_alone}
        runs |= {"light together": result.light_together, "heavy together": result.heavy_together}
        failed = {label: summary.errors for label, summary in runs.items() if summary.errors}
        if failed:
            runs_failed = "; ".join(f"{label}: {errors(counts)}" for label, counts in failed.items())
            lines.append(f"\n{result.policy}: requests not ok: {runs_failed}")
    return "\n".join(lines)


def start_server(config: FairnessConfig, model: Path, store: Path, keys: Path, policy: str) -> ServerProcess:
    """A healthy loraplex serving `policy`.

    Raises:
        SystemExit: it did not start (a server without `--scheduling` exits at once); the message
            ends with its log's tail.
    """
    port = free_port()
    env = {"OMP_NUM_THREADS": str(config.server_threads)} if config.device == "cpu" else {}
    print(f"[{policy}] starting loraplex serve --scheduling {policy} ...", flush=True)
    server = ServerProcess(f"loraplex {policy}", server_args(config, model, store, keys, port, policy), port, env, 300)
    try:
        server.wait_ready()  # stops the server when it fails
    except RuntimeError as error:
        raise SystemExit(f"loadtest.fairness: loraplex serve --scheduling {policy} did not start: {error}") from error
    return server


def run_fairness(config: FairnessConfig) -> list[PolicyResult]:
    """Build the checkpoint, measure every policy on a server of its own, and print the table.

    Raises:
        SystemExit: a server did not start.
    """
    root = Path(tempfile.mkdtemp(prefix="loraplex-fairness-"))
    try:
        model, store = build_checkpoint(config, root)
        keys = write_keys(root / "keys.toml")
        results = []
        for policy in config.policies:
            with start_server(config, model, store, keys, policy) as server:
                results.append(measure_policy(config, server.url, policy))
        print(table(results))
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parse_range(text: str, name: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        parser.error(f"{name} must look like LOW:HIGH, got {text!r}")


def parse_args(argv: list[str] | None) -> FairnessConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = FairnessConfig()
    parser.add_argument("--policies", default=",".join(defaults.policies), help="comma-separated --scheduling policies: fair, fcfs")
    parser.add_argument("--model-config", default=defaults.model_config, help="preset name, config.json path or inline JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--light-rate", type=float, default=defaults.light_rate, help="R: the light tenant's requests per second")
    parser.add_argument("--heavy-factor", type=float, default=defaults.heavy_factor, help="the heavy tenant's rate over R")
    parser.add_argument("--light-requests", type=int, default=defaults.light_requests, help="light requests per open-loop run")
    parser.add_argument("--capacity-requests", type=int, default=defaults.capacity_requests, help="requests of the capacity run")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="the server's batch bound; capacity run clients")
    parser.add_argument("--prompt-len", default="{}:{}".format(*defaults.prompt_len), help="prompt tokens, LOW:HIGH")
    parser.add_argument("--output-len", default="{}:{}".format(*defaults.output_len), help="output tokens, LOW:HIGH")
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="time bound of each run")
    parser.add_argument("--server-threads", type=int, default=defaults.server_threads, help="torch threads of the server on CPU")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    policies = tuple(policy.strip() for policy in args.policies.split(",") if policy.strip())
    prompt_len = parse_range(args.prompt_len, "--prompt-len", parser)
    output_len = parse_range(args.output_len, "--output-len", parser)
    try:
        return FairnessConfig(
            policies=policies, model_config=args.model_config, device=args.device, rank=args.rank,
            light_rate=args.light_rate, heavy_factor=args.heavy_factor, light_requests=args.light_requests,
            capacity_requests=args.capacity_requests, max_num_seqs=args.max_num_seqs, prompt_len=prompt_len,
            output_len=output_len, max_seconds=args.max_seconds, server_threads=args.server_threads, seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> list[PolicyResult]:
    return run_fairness(parse_args(argv))


if __name__ == "__main__":
    main()

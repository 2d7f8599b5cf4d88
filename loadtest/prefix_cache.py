"""`python -m loadtest.prefix_cache`: what automatic prefix caching saves when requests share a system prompt.

Owns: the prefix-caching benchmark (issue 16). One random checkpoint (`--model-config`, the
suite's `small` shape by default) with one random adapter, and two loraplex servers over them,
kept up side by side: `--enable-prefix-caching` ("cached") and `--no-enable-prefix-caching`
("uncached"). Every request is one shared system prompt (`--system-len` tokens, 512 by default)
followed by a question of its own, to that one adapter, in a closed loop of `--concurrency`
clients. After a warm-up request per server (which leaves the system prompt's blocks in the cached
server's cache, as the first request of a busy server would), `--rounds` rounds each run one fresh
trace on both servers, the order reversed every other round, and take within the round the
cached / uncached ratios of TTFT p50 and p90 and of output tokens/s. It prints every round's
ratios, their medians, and the cached server's hit rate over the measured runs from its own
/metrics (`loraplex_prefix_cache_hits_total` / `loraplex_prefix_cache_queries_total`). It must
not start servers other than loraplex, nor write anything outside its temporary directory.

    python -m loadtest.prefix_cache                       # small shape, 3 rounds, this CPU
    python -m loadtest.prefix_cache --model-config tiny --rounds 1 --requests 8
"""

import argparse
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loadtest.checkpoints import make_random_adapters, model_config, save_random_model
from loadtest.client import ClientConfig
from loadtest.driver import drive
from loadtest.records import RequestRecord
from loadtest.servers import ServerProcess, free_port, loraplex_args, scrape_counter
from loadtest.summary import distribution, format_ms, format_number
from loadtest.trace import RequestSpec

CACHED, UNCACHED = "cached", "uncached"
ADAPTER = "lora-0"
TOKEN_IDS = (10, 1000)  # prompt token ids are drawn from [low, high): inside every preset's vocabulary


@dataclass(frozen=True)
class PrefixBenchConfig:
    """Every setting of a run; `python -m loadtest.prefix_cache --help` shows them as flags.

    Args:
        model_config: a `MODEL_PRESETS` name, a config.json path or inline JSON.
        device: `cpu` or `cuda`.
        rank: the adapter's LoRA rank.
        system_len: tokens of the system prompt every request starts with.
        question_len: (min, max) tokens of each request's own question after it.
        output_len: tokens each request generates.
        requests: requests per measured run.
        concurrency: clients of the closed loop.
        rounds: measured rounds (each runs both servers).
        max_num_seqs: the servers' `--max-num-seqs`.
        max_seconds: the time bound of each run.
        server_threads: torch / OpenMP threads of each server on a CPU.
        seed: seeds the checkpoint, the adapter and every prompt.
    """

    model_config: str = "small"
    device: str = "cpu"
    rank: int = 16
    system_len: int = 512
    question_len: tuple[int, int] = (16, 64)
    output_len: int = 16
    requests: int = 32
    concurrency: int = 4
    rounds: int = 3
    max_num_seqs: int = 16
    max_seconds: float = 300.0
    server_threads: int = max(1, (os.cpu_count() or 2) - 1)  # all cores but one, which the load generator uses
    seed: int = 0

    def __post_init__(self):
        low, high = self.question_len
        if low < 1 or high < low:
            raise ValueError(f"question_len must be a range with 1 <= low <= high, got {low}:{high}")
        for name in ("system_len", "output_len", "requests", "concurrency", "rounds", "max_num_seqs", "rank", "server_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        if self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def max_positions(self) -> int:
        return self.system_len + self.question_len[1] + self.output_len + 16


@dataclass(frozen=True)
class RunFigures:
    """One server's measured run."""

    server: str
    round: int
    ttft_p50: float | None
    ttft_p90: float | None
    output_tokens_per_s: float | None
    errors: int


@dataclass(frozen=True)
class RoundRatios:
    """Cached over uncached, within one round."""

    round: int
    order: str
    ttft_p50: float | None
    ttft_p90: float | None
    output_tokens_per_s: float | None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def round_ratios(cached: RunFigures, uncached: RunFigures, order: str) -> RoundRatios:
    return RoundRatios(
        cached.round, order, ratio(cached.ttft_p50, uncached.ttft_p50), ratio(cached.ttft_p90, uncached.ttft_p90),
        ratio(cached.output_tokens_per_s, uncached.output_tokens_per_s),
    )  # fmt: skip


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def trace(config: PrefixBenchConfig, system: list[int], round_index: int) -> list[RequestSpec]:
    """`config.requests` requests: the system prompt, then a question of each one's own (fresh per round; 0: the warm-up)."""
    rng = np.random.default_rng([config.seed, round_index])
    specs = []
    for index in range(config.requests):
        question = rng.integers(*TOKEN_IDS, size=int(rng.integers(config.question_len[0], config.question_len[1] + 1))).tolist()
        prompt = system + question
        specs.append(RequestSpec(index, 0.0, ADAPTER, prompt, len(prompt), config.output_len))
    return specs


def figures(server: str, round_index: int, records: list[RequestRecord], duration: float) -> RunFigures:
    ok = [record for record in records if record.ok]
    ttft = distribution([record.ttft for record in ok if record.ttft is not None])
    tokens = sum(record.output_tokens for record in ok)
    return RunFigures(server, round_index, ttft.p50, ttft.p90, tokens / duration if duration else None, len(records) - len(ok))


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(runs: list[RunFigures], ratios: list[RoundRatios], hit_rate: float | None) -> str:
    lines = [
        "| round | order | TTFT p50 cached (ms) | uncached (ms) | cached / uncached TTFT p50 | TTFT p90 ratio |"
        " output tok/s cached | uncached | tok/s ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_round = {(run.round, run.server): run for run in runs}
    for row in ratios:
        cached, uncached = by_round[(row.round, CACHED)], by_round[(row.round, UNCACHED)]
        lines.append(
            f"| {row.round} | {row.order} | {format_ms(cached.ttft_p50)} | {format_ms(uncached.ttft_p50)} | {_ratio_text(row.ttft_p50)} |"
            f" {_ratio_text(row.ttft_p90)} | {format_number(cached.output_tokens_per_s)} | {format_number(uncached.output_tokens_per_s)} |"
            f" {_ratio_text(row.output_tokens_per_s)} |"
        )
    lines.append(
        f"| median | | | | {_ratio_text(median([r.ttft_p50 for r in ratios]))} | {_ratio_text(median([r.ttft_p90 for r in ratios]))} |"
        f" | | {_ratio_text(median([r.output_tokens_per_s for r in ratios]))} |"
    )
    lines.append("")
    lines.append(f"cached server's prefix-cache hit rate over the measured runs: {'-' if hit_rate is None else f'{hit_rate:.1%}'}")
    failed = [run for run in runs if run.errors]
    for run in failed:
        lines.append(f"round {run.round}, {run.server}: {run.errors} requests not ok")
    return "\n".join(lines)


def build_checkpoint(config: PrefixBenchConfig, root: Path) -> tuple[Path, Path]:
    """The random base and a store of one adapter under `root`; (model, store)."""
    base = model_config(config.model_config, config.max_positions)
    dtype = getattr(torch, config.dtype)
    model, store = root / "base", root / "store"
    save_random_model(model, base, dtype, config.seed)
    make_random_adapters(base, store, 1, config.rank, seed=config.seed, dtype=dtype)
    return model, store


def start_server(config: PrefixBenchConfig, model: Path, store: Path, server: str) -> ServerProcess:
    """A healthy loraplex with the prefix cache on (`cached`) or off.

    Raises:
        SystemExit: it did not start; the message ends with its log's tail.
    """
    port = free_port()
    args = loraplex_args(model, store, port, config.device, config.dtype, 1, config.max_num_seqs)
    args.append("--enable-prefix-caching" if server == CACHED else "--no-enable-prefix-caching")
    env = {"OMP_NUM_THREADS": str(config.server_threads)} if config.device == "cpu" else {}
    print(f"[{server}] starting loraplex serve {args[-1]} ...", flush=True)
    process = ServerProcess(f"loraplex {server}", args, port, env, 300)
    try:
        process.wait_ready()  # stops the server when it fails
    except RuntimeError as error:
        raise SystemExit(f"loadtest.prefix_cache: loraplex serve {args[-1]} did not start: {error}") from error
    return process


def hit_counters(url: str) -> tuple[float, float]:
    """(queries, hits) in tokens, from the server's /metrics."""
    return scrape_counter(url, "loraplex_prefix_cache_queries") or 0.0, scrape_counter(url, "loraplex_prefix_cache_hits") or 0.0


def run_prefix_cache(config: PrefixBenchConfig) -> tuple[list[RoundRatios], float | None]:
    """Build the checkpoint, start both servers, run the rounds, print the table.

    Returns:
        Each round's ratios, and the cached server's hit rate over the measured runs.

    Raises:
        SystemExit: a server did not start.
    """
    root = Path(tempfile.mkdtemp(prefix="loraplex-prefix-cache-"))
    rng = np.random.default_rng(config.seed)
    system = rng.integers(*TOKEN_IDS, size=config.system_len).tolist()
    try:
        model, store = build_checkpoint(config, root)
        with start_server(config, model, store, CACHED) as cached, start_server(config, model, store, UNCACHED) as uncached:
            urls = {CACHED: cached.url, UNCACHED: uncached.url}
            for url in urls.values():  # warm-up, unmeasured: one request of the trace's shape each
                drive(trace(config, system, 0)[:1], ClientConfig(url), config.max_seconds, 1, "warm-up", quiet=True)
            before = hit_counters(cached.url)
            runs, ratios = [], []
            for round_index in range(1, config.rounds + 1):
                order = (CACHED, UNCACHED) if round_index % 2 else (UNCACHED, CACHED)
                measured = {}
                for server in order:
                    print(f"[round {round_index}] {server}: {config.requests} requests, {config.concurrency} clients ...", flush=True)
                    records, duration = drive(
                        trace(config, system, round_index), ClientConfig(urls[server]), config.max_seconds,
                        config.concurrency, f"{server} round {round_index}", quiet=True,
                    )  # fmt: skip
                    measured[server] = figures(server, round_index, records, duration)
                runs.extend(measured.values())
                ratios.append(round_ratios(measured[CACHED], measured[UNCACHED], " then ".join(order)))
            after = hit_counters(cached.url)
        hit_rate = ratio(after[1] - before[1], after[0] - before[0])
        print(table(runs, ratios, hit_rate))
        return ratios, hit_rate
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None) -> PrefixBenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = PrefixBenchConfig()
    parser.add_argument("--model-config", default=defaults.model_config, help="preset name, config.json path or inline JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--system-len", type=int, default=defaults.system_len, help="tokens of the shared system prompt")
    parser.add_argument("--question-len", default="{}:{}".format(*defaults.question_len), help="each request's own tokens, LOW:HIGH")
    parser.add_argument("--output-len", type=int, default=defaults.output_len, help="tokens each request generates")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests per measured run")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="clients of the closed loop")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="time bound of each run")
    parser.add_argument("--server-threads", type=int, default=defaults.server_threads, help="torch threads of each server on CPU")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    low, _, high = args.question_len.partition(":")
    try:
        question_len = (int(low), int(high or low))
        return PrefixBenchConfig(
            model_config=args.model_config, device=args.device, rank=args.rank, system_len=args.system_len,
            question_len=question_len, output_len=args.output_len, requests=args.requests, concurrency=args.concurrency,
            rounds=args.rounds, max_num_seqs=args.max_num_seqs, max_seconds=args.max_seconds,
            server_threads=args.server_threads, seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> tuple[list[RoundRatios], float | None]:
    return run_prefix_cache(parse_args(argv))


if __name__ == "__main__":
    main()

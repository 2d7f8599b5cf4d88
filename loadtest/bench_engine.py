"""Throughput of loraplex's batched multi-LoRA engine against PEFT, in one run on one machine.

Owns: the benchmark workload (concurrent requests with seeded random prompts, greedy, fixed output
length), the four timed configurations, the correctness cross-check against PEFT and the goals
table. Configurations, each timed after a short warm-up:

    (a) engine, every request base-only
    (b) engine, requests spread over distinct adapters
    (c) PEFT, one left-padded static batch with `adapter_names` (mixed-batch inference)
    (d) PEFT, one request at a time after `set_adapter`

Each configuration's figure is its fastest of `--repeats` rounds. It builds its own random
checkpoints in a temporary directory and must not change the engine.

    python -m loadtest.bench_engine [--repeats N] [--json PATH]
"""

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from loadtest.baselines.peft_model import load_peft, peft_mixed_batch, peft_one_at_a_time
from loadtest.checkpoints import SPECIAL_TOKENS, ModelShape, make_adapters, make_model
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

# (label, numerator, denominator, goal): throughput ratios the engine is meant to reach.
GOALS = (("(b)/(a)", "b", "a", 0.75), ("(b)/(c)", "b", "c", 2.0), ("(b)/(d)", "b", "d", 8.0))
LABELS = {
    "a": "(a) engine, base only",
    "b": "(b) engine, multi-LoRA",
    "c": "(c) PEFT mixed batch",
    "d": "(d) PEFT one at a time",
}
WARMUP_PROMPT = 16
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    adapters: list[str]  # the adapter of each request in the multi-LoRA configurations
    max_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.prompts) * self.max_tokens

    def head(self, count: int, prompt_len: int) -> "Workload":
        """A short workload of the first `count` requests cut to `prompt_len` tokens, for warm-ups."""
        prompts = [p[:prompt_len] for p in self.prompts[:count]]
        return Workload(prompts, self.adapters[:count], WARMUP_TOKENS)


@dataclass
class Timing:
    seconds: list[float]  # one entry per repeat
    outputs: list[list[int]]  # the last repeat's generated ids, one list per request

    @property
    def best(self) -> float:
        """The fastest repeat: on a shared machine, slower ones measure the neighbours."""
        return min(self.seconds)


def make_workload(args, adapter_names: list[str]) -> Workload:
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.num_requests,), generator=generator)
    prompts = [
        torch.randint(len(SPECIAL_TOKENS), args.vocab_size, (int(n),), generator=generator).tolist() for n in lengths
    ]
    adapters = [adapter_names[i % len(adapter_names)] for i in range(args.num_requests)]
    return Workload(prompts, adapters, args.max_tokens)


def timed(run: Callable[[Workload], list[list[int]]], workload: Workload, timing: Timing) -> None:
    """Run `workload` once, adding the wall time to `timing` and keeping the outputs."""
    started = time.perf_counter()
    timing.outputs = run(workload)
    timing.seconds.append(time.perf_counter() - started)


# ----- the engine ---------------------------------------------------------------------------


def engine_generate(engine: Engine, workload: Workload, with_adapters: bool) -> list[list[int]]:
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0, ignore_eos=True)
    adapters = workload.adapters if with_adapters else [None] * len(workload.prompts)
    return [c.output_ids for c in engine.generate(workload.prompts, adapters, params)]


def build_engine(args, model_dir: Path, adapter_dirs: dict[str, Path]) -> Engine:
    config = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        max_loras=args.num_adapters,
        max_lora_rank=args.rank,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_prompt + args.max_tokens,
    )
    engine = Engine(config)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


# ----- the run ------------------------------------------------------------------------------


def run_benchmark(args, workdir: Path) -> tuple[dict[str, Timing], Workload]:
    """Build everything, warm every system up, then time (a) to (d) in turn, `repeats` rounds."""
    shape = ModelShape(
        args.hidden_size, args.intermediate_size, args.num_layers, args.num_heads, args.num_kv_heads, args.vocab_size
    )
    model_dir = make_model(workdir / "base", shape, args.max_prompt + args.max_tokens, args.seed)
    adapter_dirs = make_adapters(model_dir, workdir, args.num_adapters, args.rank)
    workload = make_workload(args, list(adapter_dirs))
    warmup = workload.head(max(args.num_adapters, 2), WARMUP_PROMPT)
    engine = build_engine(args, model_dir, adapter_dirs)
    model = load_peft(model_dir, adapter_dirs)
    runs = {
        "a": lambda work: engine_generate(engine, work, with_adapters=False),
        "b": lambda work: engine_generate(engine, work, with_adapters=True),  # warm-up fills the slots
        "c": lambda work: peft_mixed_batch(model, work.prompts, work.adapters, work.max_tokens),
        "d": lambda work: peft_one_at_a_time(model, work.prompts, work.adapters, work.max_tokens),
    }
    timings = {key: Timing([], []) for key in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(warmup)
        for _ in range(args.repeats):
            for key, run in runs.items():
                timed(run, workload, timings[key])
    return timings, workload


def matching_requests(outputs: list[list[int]], reference: list[list[int]]) -> int:
    return sum(out == ref for out, ref in zip(outputs, reference, strict=True))


def summarize(args, timings: dict[str, Timing], workload: Workload) -> dict:
    tokens = workload.num_output_tokens
    for key, timing in timings.items():
        generated = sum(len(out) for out in timing.outputs)
        if generated != tokens:
            raise RuntimeError(f"{LABELS[key]} generated {generated} tokens, expected {tokens}")
    throughput = {key: tokens / timing.best for key, timing in timings.items()}
    ratios = {label: throughput[num] / throughput[den] for label, num, den, _ in GOALS}
    n = len(workload.prompts)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "output_tokens": tokens,
        "seconds": {key: timing.seconds for key, timing in timings.items()},
        "tokens_per_s": throughput,
        "ratios": ratios,
        "goals_met": {label: ratios[label] >= goal for label, _, _, goal in GOALS},
        "b_equals_d_requests": matching_requests(timings["b"].outputs, timings["d"].outputs),
        "c_equals_d_requests": matching_requests(timings["c"].outputs, timings["d"].outputs),
        "b_differs_from_a_requests": n - matching_requests(timings["b"].outputs, timings["a"].outputs),
        "num_requests": n,
    }


def print_report(summary: dict) -> None:
    console = Console()
    throughput = Table(title=f"{summary['num_requests']} requests x {summary['config']['max_tokens']} new tokens")
    throughput.add_column("configuration")
    throughput.add_column("seconds (best)", justify="right")
    throughput.add_column("output tokens/s", justify="right")
    for key, label in LABELS.items():
        seconds = min(summary["seconds"][key])
        throughput.add_row(label, f"{seconds:.2f}", f"{summary['tokens_per_s'][key]:.1f}")
    console.print(throughput)
    goals = Table(title="goals")
    for column in ("ratio", "measured", "goal", "met"):
        goals.add_column(column, justify="right")
    for label, _, _, goal in GOALS:
        met = "yes" if summary["goals_met"][label] else "NO"
        goals.add_row(label, f"{summary['ratios'][label]:.2f}", f">= {goal:g}", met)
    console.print(goals)
    n = summary["num_requests"]
    identical = summary["b_equals_d_requests"] == n
    matched = f"{summary['b_equals_d_requests']}/{n} requests, (b) vs (d), float32"
    console.print(f"outputs identical to PEFT: {'yes' if identical else 'no'} ({matched})")
    console.print(f"PEFT mixed batch (c) equal to (d): {summary['c_equals_d_requests']}/{n} requests")
    console.print(f"adapters change the output ((b) vs (a)): {summary['b_differs_from_a_requests']}/{n} requests")
    console.print(f"total run time: {summary['total_seconds']:.1f} s (build, load, warm-up, timing; imports excluded)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = ModelShape()
    parser.add_argument("--hidden-size", type=int, default=shape.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=shape.intermediate_size)
    parser.add_argument("--num-layers", type=int, default=shape.num_layers)
    parser.add_argument("--num-heads", type=int, default=shape.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=shape.num_kv_heads)
    parser.add_argument("--vocab-size", type=int, default=shape.vocab_size)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=16, help="shortest prompt, in tokens")
    parser.add_argument("--max-prompt", type=int, default=128, help="longest prompt, in tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--num-adapters", type=int, default=8, help="distinct adapters (also max_loras)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--repeats", type=int, default=1, help="timing rounds over (a)-(d); the fastest of each counts")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not 1 <= args.min_prompt <= args.max_prompt:
        parser.error("need 1 <= --min-prompt <= --max-prompt")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations inside peft
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as workdir:
        timings, workload = run_benchmark(args, Path(workdir))
    summary = summarize(args, timings, workload)
    summary["total_seconds"] = time.perf_counter() - started
    print_report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()

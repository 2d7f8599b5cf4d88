"""Throughput of loraplex's batched multi-LoRA engine against PEFT, in one run on one machine.

Owns: the benchmark workload (concurrent requests with seeded random prompts, greedy, fixed output
length), the four timed configurations, the correctness cross-check against PEFT and the goals
table. Configurations, each timed after a short warm-up:

    (a) engine, every request base-only
    (b) engine, requests spread over distinct adapters
    (c) PEFT, one left-padded static batch with `adapter_names` (mixed-batch inference)
    (d) PEFT, one request at a time after `set_adapter`

It builds its own random checkpoints in a temporary directory and must not change the engine.

    python -m loadtest.bench_engine [--repeats N] [--json PATH]
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

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
    seconds: list[float]
    outputs: list[list[int]]  # the last repeat's generated ids, one list per request

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def make_workload(args, adapter_names: list[str]) -> Workload:
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.num_requests,), generator=generator)
    prompts = [
        torch.randint(len(SPECIAL_TOKENS), args.vocab_size, (int(n),), generator=generator).tolist() for n in lengths
    ]
    adapters = [adapter_names[i % len(adapter_names)] for i in range(args.num_requests)]
    return Workload(prompts, adapters, args.max_tokens)


def timed(run: Callable[[], list[list[int]]], repeats: int) -> Timing:
    seconds, outputs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = run()
        seconds.append(time.perf_counter() - started)
    return Timing(seconds, outputs)


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


# ----- PEFT ---------------------------------------------------------------------------------


def load_peft(model_dir: Path, adapter_dirs: dict[str, Path]) -> PeftModel:
    """The base with every adapter loaded under its name, PEFT's documented way."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    (first, first_dir), *rest = adapter_dirs.items()
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both [N, max_len], prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def peft_mixed_batch(model: PeftModel, workload: Workload) -> list[list[int]]:
    input_ids, attention_mask = left_padded(workload.prompts, model.config.pad_token_id)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        adapter_names=workload.adapters,
        max_new_tokens=workload.max_tokens,
        min_new_tokens=workload.max_tokens,
        do_sample=False,
    )  # [N, max_len + max_tokens]
    return output[:, input_ids.shape[1] :].tolist()


def peft_one_at_a_time(model: PeftModel, workload: Workload) -> list[list[int]]:
    outputs = []
    for prompt, adapter in zip(workload.prompts, workload.adapters):
        model.set_adapter(adapter)
        input_ids = torch.tensor([prompt])  # [1, n]
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=workload.max_tokens,
            min_new_tokens=workload.max_tokens,
            do_sample=False,
        )
        outputs.append(output[0, input_ids.shape[1] :].tolist())
    return outputs


# ----- the run ------------------------------------------------------------------------------


def run_benchmark(args, workdir: Path) -> tuple[dict[str, Timing], Workload]:
    shape = ModelShape(
        args.hidden_size, args.intermediate_size, args.num_layers, args.num_heads, args.num_kv_heads, args.vocab_size
    )
    model_dir = make_model(workdir / "base", shape, args.max_prompt + args.max_tokens, args.seed)
    adapter_dirs = make_adapters(model_dir, workdir, args.num_adapters, args.rank)
    workload = make_workload(args, list(adapter_dirs))
    warmup = workload.head(max(args.num_adapters, 2), WARMUP_PROMPT)

    engine = build_engine(args, model_dir, adapter_dirs)
    engine_generate(engine, warmup, with_adapters=False)
    engine_generate(engine, warmup, with_adapters=True)  # also loads every adapter into its slot
    timings = {}
    timings["a"] = timed(lambda: engine_generate(engine, workload, with_adapters=False), args.repeats)
    timings["b"] = timed(lambda: engine_generate(engine, workload, with_adapters=True), args.repeats)
    del engine

    model = load_peft(model_dir, adapter_dirs)
    with torch.inference_mode():
        peft_mixed_batch(model, warmup)
        timings["c"] = timed(lambda: peft_mixed_batch(model, workload), args.repeats)
        peft_one_at_a_time(model, warmup.head(1, WARMUP_PROMPT))
        timings["d"] = timed(lambda: peft_one_at_a_time(model, workload), args.repeats)
    return timings, workload


def matching_requests(outputs: list[list[int]], reference: list[list[int]]) -> int:
    return sum(out == ref for out, ref in zip(outputs, reference, strict=True))


def summarize(args, timings: dict[str, Timing], workload: Workload) -> dict:
    tokens = workload.num_output_tokens
    for key, timing in timings.items():
        generated = sum(len(out) for out in timing.outputs)
        if generated != tokens:
            raise RuntimeError(f"{LABELS[key]} generated {generated} tokens, expected {tokens}")
    throughput = {key: tokens / timing.median for key, timing in timings.items()}
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
    from rich.console import Console
    from rich.table import Table

    console = Console()
    throughput = Table(title=f"{summary['num_requests']} requests x {summary['config']['max_tokens']} new tokens")
    throughput.add_column("configuration")
    throughput.add_column("seconds (median)", justify="right")
    throughput.add_column("output tokens/s", justify="right")
    for key, label in LABELS.items():
        seconds = statistics.median(summary["seconds"][key])
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
    console.print(f"outputs identical to PEFT: {'yes' if identical else 'no'} ({summary['b_equals_d_requests']}/{n} requests, (b) vs (d), float32)")
    console.print(f"PEFT mixed batch (c) equal to (d): {summary['c_equals_d_requests']}/{n} requests")
    console.print(f"adapters change the output ((b) vs (a)): {summary['b_differs_from_a_requests']}/{n} requests")
    console.print(f"total run time: {summary['total_seconds']:.1f} s")


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
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the median counts")
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
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as workdir:
        timings, workload = run_benchmark(args, Path(workdir))
    summary = summarize(args, timings, workload)
    summary["total_seconds"] = time.perf_counter() - started
    print_report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()

"""`python -m loadtest.structured_output`: what structured outputs cost the engine's throughput.

Owns: the structured-output benchmark and its target: output tokens/s with half the requests
constrained by a JSON schema is at least 0.9 x output tokens/s with none. On the suite's default
shape (suite_config.py: the `tiny` preset, rank-16 adapters on all seven projections, 32 sequences
at once, prompts of 16 to 128 tokens, 16 to 64 output tokens, one torch thread on a CPU), with a
byte-level BPE tokenizer of the preset's 4,096 tokens in place of the suite's word-level one (a
word-level vocabulary cannot spell JSON). Each round runs the same seeded requests, spread over
the adapters and the base, twice: all unconstrained, then every other one constrained (alternating
which goes first from round to round), all submitted at once to one engine; the figure is the
median over rounds of each round's ratio (beside it, the same for output tokens per CPU second of
the process, every thread counted, which a neighbour's load moves much less); a neighbour's load
on a shared machine, which drifts over seconds, touches both sides of a round's ratio alike. The
schema's array has more items than 64 tokens can spell, so every constrained request runs to its
max_tokens, as unconstrained ones do, and both runs generate the same tokens. It prints each
round's figures, the median ratio and pass/fail, all measured in the same run. An unmeasured
warm-up round comes first (the grammar is compiled once there, as a server's cache does for a
repeated schema). It builds its checkpoints in a temporary directory and writes nothing else.

    python -m loadtest.structured_output                 # the suite's default shape, 5 rounds
    python -m loadtest.structured_output --requests 64 --rounds 1
    python -m loadtest.structured_output --device cuda   # the same shape on a GPU
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loadtest.checkpoints import make_random_adapters, model_config, save_random_model
from loadtest.grammar_compare import byte_bpe
from loadtest.suite_config import SuiteConfig
from loraplex.api.structured_output import grammar_for_schema
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

TARGET = 0.9  # half constrained / none
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 64},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def build(args, workdir: Path) -> tuple[Engine, list[str]]:
    suite = SuiteConfig()
    config = model_config(suite.model_config, max_positions=args.max_prompt + args.max_output + 8)
    model_dir = save_random_model(workdir / "base", config, seed=suite.seed)
    byte_bpe(model_dir, config.vocab_size)  # replaces the word-level tokenizer
    adapters = make_random_adapters(config, workdir / "adapters", args.adapters, suite.rank, seed=suite.seed)
    engine = Engine(
        EngineConfig(
            model=str(model_dir), device=args.device, dtype="float32", max_loras=args.adapters, max_lora_rank=suite.rank,
            max_num_seqs=suite.concurrency, max_model_len=args.max_prompt + args.max_output + 8,
        )
    )  # fmt: skip
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    engine.prefetch()
    return engine, [None, *adapters]


def workload(args, models: list[str | None], vocab: int) -> tuple[list[list[int]], list[str | None], list[int]]:
    generator = torch.Generator().manual_seed(args.seed)
    prompts, adapters, lengths = [], [], []
    for i in range(args.requests):
        length = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=generator))
        prompts.append(torch.randint(3, vocab, (length,), generator=generator).tolist())
        adapters.append(models[i % len(models)])
        lengths.append(int(torch.randint(args.min_output, args.max_output + 1, (1,), generator=generator)))
    return prompts, adapters, lengths


def timed_run(engine: Engine, prompts, adapters, lengths, grammar: str | None) -> tuple[float, int, float]:
    """(output tokens/s, output tokens, CPU seconds of the process, every thread's) of one run.

    With `grammar`, every other request is constrained by it.
    """
    params = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, grammar=grammar if grammar and i % 2 == 0 else None)
        for i, n in enumerate(lengths)
    ]
    start, cpu = time.perf_counter(), time.process_time()
    completions = engine.generate(prompts, adapters, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(c.output_ids) for c in completions)
    return tokens / elapsed, tokens, cpu


def parse_args(argv=None) -> argparse.Namespace:
    suite = SuiteConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128, help="requests per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=suite.device, choices=("cpu", "cuda"))
    parser.add_argument("--adapters", type=int, default=8, help="adapters the requests spread over (with the base)")
    parser.add_argument("--min-prompt", type=int, default=suite.prompt_len[0])
    parser.add_argument("--max-prompt", type=int, default=suite.prompt_len[1])
    parser.add_argument("--min-output", type=int, default=suite.output_len[0])
    parser.add_argument("--max-output", type=int, default=suite.output_len[1])
    parser.add_argument("--threads", type=int, default=suite.server_threads, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        engine, models = build(args, Path(tmp))
        grammar = grammar_for_schema(SCHEMA, "schema")
        prompts, adapters, lengths = workload(args, models, engine.vocab_size)
        for warm_grammar in (None, grammar):  # an unmeasured round: kernels for every batch shape, the tokenizer, the template
            timed_run(engine, prompts, adapters, lengths, warm_grammar)
        figures: dict[str, list[float]] = {"none": [], "half": []}
        ratios, cpu_ratios, counts, cpu = [], [], {}, {}
        for round_index in range(args.rounds):
            order = ("none", "half") if round_index % 2 == 0 else ("half", "none")
            for kind in order:
                rate, tokens, cpu[kind] = timed_run(engine, prompts, adapters, lengths, grammar if kind == "half" else None)
                figures[kind].append(rate)
                counts[kind] = tokens
            ratios.append(figures["half"][-1] / figures["none"][-1])
            cpu_ratios.append(cpu["none"] / cpu["half"])
            print(
                f"round {round_index + 1}: none {figures['none'][-1]:.1f} tok/s, "
                f"half constrained {figures['half'][-1]:.1f} tok/s, ratio {ratios[-1]:.3f} "
                f"(CPU seconds none / half {cpu['none']:.2f} / {cpu['half']:.2f} = {cpu_ratios[-1]:.3f})"
            )
    ratio = statistics.median(ratios)
    verdict = "pass" if ratio >= TARGET else "FAIL"
    print(
        f"median over {args.rounds} rounds: none {statistics.median(figures['none']):.1f} tok/s, half constrained "
        f"{statistics.median(figures['half']):.1f} tok/s; ratio {ratio:.3f} (target >= {TARGET}: {verdict}); "
        f"output tokens per run {counts['none']} / {counts['half']}; "
        f"tokens per CPU second, half / none: {statistics.median(cpu_ratios):.3f}"
    )
    return {
        "none": figures["none"], "half": figures["half"], "ratios": ratios, "ratio": ratio,
        "cpu_ratio": statistics.median(cpu_ratios), "tokens": counts,
    }  # fmt: skip


if __name__ == "__main__":
    main()

"""The prepared GPU check's benchmark: a Llama-3-8B-shaped model with random weights, on one device.

Owns: building the random base and rank-16 adapters on all seven projections directly on the
device (no checkpoint on disk), timing loraplex's engine with the base only and with N = 8 and
N = 64 adapters of power-law popularity, PEFT's mixed batch (`adapter_names`) on the same base as
the baseline, one decode step against the memory-bandwidth roofline (weights, the step's distinct
adapters and its KV cache read once, over `--bandwidth`), and the Markdown table of it all. It
times nothing in tests: a CPU run with `--shape tiny` (tests/test_gpu_check.py) checks that every
path runs. `loadtest/gpu_check.sh` runs it on a lent GPU after the gpu and kernels tests.

    python -m loadtest.gpu_check --out gpu_check.md [--shape llama3-8b|tiny] [--device cuda|cpu]
"""

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig

from loadtest.checkpoints import ALL_TARGETS, INIT_STD, make_tokenizer
from loadtest.trace import popularity
from loraplex.config import EngineConfig
from loraplex.engine.base_model import BaseModel
from loraplex.engine.engine import Engine
from loraplex.engine.request import Request, SamplingParams
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.lora.adapter import build_adapter


@dataclass(frozen=True)
class Shape:
    """A model and the workload run on it."""

    model: dict  # LlamaConfig fields
    requests: int
    prompt: tuple[int, int]  # shortest and longest prompt, tokens
    new_tokens: int
    peft_requests: int  # PEFT's batch: it pads every row to the longest and routes rows per module
    decode_batch: int
    decode_context: int


SHAPES = {
    "llama3-8b": Shape(
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
        requests=256, prompt=(64, 256), new_tokens=128, peft_requests=32, decode_batch=64, decode_context=512,
    ),
    "tiny": Shape(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512),
        requests=12, prompt=(4, 16), new_tokens=4, peft_requests=4, decode_batch=4, decode_context=16,
    ),
}  # fmt: skip
RANK = 16
ADAPTER_COUNTS = (8, 64)
POPULARITY_ALPHA = 1.0
DECODE_REPEATS = 10


def build_base(shape: Shape, dtype: torch.dtype, device: torch.device, workdir: Path, seed: int) -> BaseModel:
    """A random Llama of `shape`, initialized on `device` (normal(0, 0.02) weights, as transformers does)."""
    max_len = shape.prompt[1] + shape.new_tokens + 1
    config = LlamaConfig(**shape.model, max_position_embeddings=max(max_len, shape.decode_context + 1), tie_word_embeddings=False)
    config.initializer_range = INIT_STD
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    tokenizer = make_tokenizer(workdir / "tokenizer", config.vocab_size)
    return BaseModel(model.eval(), tokenizer, device, dtype, "none", "random-llama")


def adapter_tensors(model, rank: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One random adapter in PEFT's saved layout, on the host: `base_model.model.<module>.lora_A.weight` [r, in], B [out, r]."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ALL_TARGETS and hasattr(module, "in_features"):
            for key, shape in (("lora_A", (rank, module.in_features)), ("lora_B", (module.out_features, rank))):
                weight = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * INIT_STD
                tensors[f"base_model.model.{name}.{key}.weight"] = weight.to(dtype).cpu()
    return tensors


def lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(ALL_TARGETS), lora_dropout=0.0)


def workload(shape: Shape, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(shape.prompt[0], shape.prompt[1] + 1, size=count)
    return [rng.integers(3, shape.model["vocab_size"], size=int(n)).tolist() for n in lengths]


def popular_adapters(names: list[str], count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [names[i] for i in rng.choice(len(names), size=count, p=popularity(len(names), POPULARITY_ALPHA))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peft_mixed(model, tensors: dict[str, dict], prompts, adapters, new_tokens: int, device) -> tuple[float, list[list[int]]]:
    """PEFT's mixed batch over the same base: (seconds of the timed run, outputs). Leaves the base unwrapped."""
    names = sorted(set(adapters))
    peft_model = get_peft_model(model, lora_config(), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora_config())
    for name in names:
        set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in tensors[name].items()}, adapter_name=name)
    peft_model.eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), adapter_names=adapters, do_sample=False,
                  pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        peft_model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        output = peft_model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        synchronize(device)
        seconds = time.perf_counter() - started
    peft_model.unload()
    return seconds, output[:, width:].tolist()


def timed_generate(engine: Engine, prompts, adapters, new_tokens: int, device) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate([p[:8] for p in prompts[:16]], adapters[:16], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    synchronize(device)
    started = time.perf_counter()
    completions = engine.generate(prompts, adapters, params)
    synchronize(device)
    return time.perf_counter() - started, [c.output_ids for c in completions]


def decode_step_seconds(engine: Engine, shape: Shape, adapters: list, device) -> float:
    """Mean seconds of one decode step of `decode_batch` sequences at `decode_context` tokens of context."""
    cache = engine.kv_cache
    length = shape.decode_context
    requests = []
    for i, adapter in enumerate(adapters):
        request = Request(f"decode-{i}", [3 + (i + j) % 97 for j in range(length)], adapter, SamplingParams(max_tokens=1))
        request.block_table = cache.allocator.allocate(cache.blocks_needed(length))
        request.slot = None if adapter is None else engine.slots.acquire(adapter)
        requests.append(request)
    try:
        engine.slot_writer.ready_for_step()
        engine.runner.run([ScheduledSeq(r, 0, length - 1) for r in requests], engine.null_slot)  # prefill the context
        step = [ScheduledSeq(r, length - 1, 1) for r in requests]
        engine.runner.run(step, engine.null_slot)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(DECODE_REPEATS):
            engine.runner.run(step, engine.null_slot)
        synchronize(device)
        return (time.perf_counter() - started) / DECODE_REPEATS
    finally:
        for request in requests:
            cache.allocator.free(request.block_table)
            if request.adapter is not None:
                engine.slots.release(request.adapter)


def graph_figures(engine: Engine, shape: Shape, names: list[str], prompts, device, seed: int) -> dict:
    """Decode steps and N = 64 throughput again with `--cuda-graphs`' captured decode steps (or why capture failed)."""
    from loraplex.engine.decode_graphs import DecodeGraphs, bucket_sizes

    try:
        started = time.perf_counter()
        engine.runner.graphs = DecodeGraphs(
            engine.runner, bucket_sizes(engine.config.max_num_seqs), engine.null_slot, engine.config.max_lora_rank,
            engine.kv_cache.scratch_slot, engine.max_model_len,
        )  # fmt: skip
        figures = {"capture_seconds": time.perf_counter() - started}
        count = max(ADAPTER_COUNTS)
        base_only = [None] * shape.decode_batch
        mixed = [engine.adapters[names[i % count]] for i in range(shape.decode_batch)]
        figures["decode_base_s"] = decode_step_seconds(engine, shape, base_only, device)
        figures["decode_mixed_s"] = decode_step_seconds(engine, shape, mixed, device)
        seconds, _ = timed_generate(engine, prompts, popular_adapters(names, len(prompts), seed + count), shape.new_tokens, device)
        figures["tok_s_64"] = len(prompts) * shape.new_tokens / seconds
        figures["replays"] = engine.runner.graphs.replays
        return figures
    except Exception as exc:  # a capture that fails is a finding to report, not a reason to lose the other figures
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        engine.runner.graphs = None


def roofline_seconds(engine: Engine, base: BaseModel, shape: Shape, adapters: list, bandwidth: float) -> float:
    """Bytes one decode step must read once (weights but the embedding table, distinct adapters, KV) over `bandwidth`."""
    model = base.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - model.get_input_embeddings().weight.nbytes
    distinct = {a.uid: a for a in adapters if a is not None}.values()
    adapter_bytes = sum(a.nbytes for a in distinct)
    keys = engine.kv_cache.keys  # one [slots, kv_heads, head_dim] tensor per layer
    kv = len(adapters) * shape.decode_context * 2 * len(keys) * keys[0][0].numel() * keys[0].element_size()
    return (weights + adapter_bytes + kv) / bandwidth


def run(args) -> dict:
    shape, device, dtype = SHAPES[args.shape], torch.device(args.device), getattr(torch, args.dtype)
    results: dict = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "kernel_backend": args.kernel_backend}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-check-") as workdir:
        started = time.perf_counter()
        base = build_base(shape, dtype, device, Path(workdir), args.seed)
        names = [f"lora-{i}" for i in range(max(ADAPTER_COUNTS))]
        tensors = {name: adapter_tensors(base.model, RANK, args.seed + i, device, dtype) for i, name in enumerate(names)}
        results["build_seconds"] = time.perf_counter() - started
        prompts = workload(shape, shape.requests, args.seed)
        peft_prompts, peft_adapters = prompts[: shape.peft_requests], popular_adapters(names[:8], shape.peft_requests, args.seed)
        seconds, peft_outputs = peft_mixed(base.model, tensors, peft_prompts, peft_adapters, shape.new_tokens, device)
        results["peft_mixed_tok_s"] = shape.peft_requests * shape.new_tokens / seconds
        config = EngineConfig(
            model="random", dtype=args.dtype, device=device.type, max_loras=max(ADAPTER_COUNTS), max_lora_rank=RANK,
            max_num_seqs=shape.requests, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=base.model.config.max_position_embeddings, kernel_backend=args.kernel_backend,
        )  # fmt: skip
        engine = Engine(config, base=base)
        results["kernels"], results["kv_cache"] = engine.kernel_backend, engine.kv_summary
        config_json = json.loads(json.dumps(lora_config().to_dict(), default=sorted))
        for name in names:
            engine.register_adapter(build_adapter(name, config_json, tensors[name], engine.module_shapes, RANK, engine.dtype))
        seconds, outputs = timed_generate(engine, peft_prompts, peft_adapters, shape.new_tokens, device)
        results["engine_on_peft_workload_tok_s"] = shape.peft_requests * shape.new_tokens / seconds
        results["peft_equal_requests"] = sum(a == b for a, b in zip(outputs, peft_outputs))
        results["peft_requests"] = shape.peft_requests
        throughput = {}
        for count in (0, *ADAPTER_COUNTS):
            adapters = [None] * len(prompts) if count == 0 else popular_adapters(names[:count], len(prompts), args.seed + count)
            seconds, _ = timed_generate(engine, prompts, adapters, shape.new_tokens, device)
            throughput[count] = len(prompts) * shape.new_tokens / seconds
        results["tok_s"] = throughput
        decode = {}
        for count in (0, max(ADAPTER_COUNTS)):
            adapters = [None] * shape.decode_batch if count == 0 else [engine.adapters[names[i % count]] for i in range(shape.decode_batch)]
            measured = decode_step_seconds(engine, shape, adapters, device)
            distinct = len({a.uid for a in adapters if a is not None})
            decode[distinct] = (measured, roofline_seconds(engine, base, shape, adapters, args.bandwidth))
        results["decode"] = decode
        if device.type == "cuda" and engine.kernel_backend == "triton":
            results["graphs"] = graph_figures(engine, shape, names, prompts, device, args.seed)
    results["total_seconds"] = time.perf_counter() - started
    return results


def markdown(results: dict) -> str:
    """The table for BENCHMARKS.md and the closing note, with the issue's targets."""
    tok = results["tok_s"]
    base = tok[0]
    lines = [
        f"GPU check: `{results['shape']}` shape, random weights, {results['dtype']}, on {results.get('gpu', results['device'])}; "
        f"kernels: {results['kernels']}; KV cache: {results['kv_cache']}",
        "",
        "| what | figure | target |",
        "|---|---|---|",
        f"| loraplex, base only | {base:,.0f} output tok/s | |",
    ]
    for count in ADAPTER_COUNTS:
        ratio = tok[count] / base
        target = ("≥ 0.95 ✓" if ratio >= 0.95 else "≥ 0.95 ✗") if count == max(ADAPTER_COUNTS) else ""
        lines.append(f"| loraplex, N = {count} | {tok[count]:,.0f} output tok/s, {ratio:.2f} × base only | {target} |")
    ours, peft = results["engine_on_peft_workload_tok_s"], results["peft_mixed_tok_s"]
    lines.append(
        f"| PEFT mixed batch, N = 8, {results['peft_requests']} requests | {peft:,.0f} output tok/s; "
        f"loraplex on the same requests {ours:,.0f}: {ours / peft:.1f} × | ≥ 30 × {'✓' if ours / peft >= 30 else '✗'} |"
    )
    for count, (measured, roofline) in results["decode"].items():
        ratio = measured / roofline
        label = "base only" if count == 0 else f"{count} distinct adapters"
        lines.append(
            f"| decode step, {label} | {measured * 1e3:.2f} ms, roofline {roofline * 1e3:.2f} ms: {ratio:.2f} × | "
            f"≤ 2 × {'✓' if ratio <= 2 else '✗'} |"
        )
    graphs = results.get("graphs")
    if graphs is not None and "error" in graphs:
        lines.append(f"| CUDA graphs (`--cuda-graphs`) | capture failed: {graphs['error']} | |")
    elif graphs is not None:
        lines.append(
            f"| CUDA graphs (`--cuda-graphs`), {graphs['capture_seconds']:.1f} s to capture | decode step base only "
            f"{graphs['decode_base_s'] * 1e3:.2f} ms, with adapters {graphs['decode_mixed_s'] * 1e3:.2f} ms; N = 64 "
            f"{graphs['tok_s_64']:,.0f} output tok/s ({graphs['replays']} steps replayed) | |"
        )
    equal = f"{results['peft_equal_requests']} / {results['peft_requests']}"
    lines.append(f"| greedy outputs equal to PEFT's (bf16: ties may break apart) | {equal} | |")
    lines += ["", f"Total {results['total_seconds']:.0f} s, of which building the model and adapters {results['build_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--kernel-backend", choices=("auto", "reference", "triton"), default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s the roofline assumes (H200 copy: ~4.3 TB/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the Markdown table")
    parser.add_argument("--json", type=Path, help="also the figures as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    table = markdown(results)
    args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()

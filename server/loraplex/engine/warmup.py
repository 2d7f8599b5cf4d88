"""The start-up check: run every path of a step once before the server says it is healthy.

Owns: `check_model_runs`, which prefills and then decodes two synthetic sequences (one base-only,
one in a LoRA slot at the largest rank, one asking for prompt logprobs) through each LoRA
strategy, and samples from the logits greedily and at random with top-k and top-p, so a model the
engine cannot run (a kernel that refuses a layer's shape, a dtype a device lacks) fails at start,
naming the layer, instead of failing every request with `/health` green. It leaves the engine as
it found it: KV blocks freed, the slot untouched (the synthetic adapter is all zeros and never
written), no request or counter left behind. It must not run once requests are being served.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loraplex.engine.request import Request, SamplingParams
from loraplex.engine.sampling import sample, token_logprobs
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.errors import ModelLoadError
from loraplex.lora.adapter import LoraAdapter

PROMPT_TOKENS = 16  # enough for the segment strategy's heuristic, small enough to be quick


@contextmanager
def _innermost_module(model: torch.nn.Module) -> Iterator[list[str]]:
    """Track the modules being run: after an exception, the last name is the one that raised."""
    names = {module: name for name, module in model.named_modules()}
    entered: list[str] = []

    def enter(module: torch.nn.Module, args) -> None:
        entered.append(names[module] or "model")

    def leave(module: torch.nn.Module, args, output) -> None:  # returning None keeps the output
        entered.pop()

    handles = []
    for module in names:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield entered
    finally:
        for handle in handles:
            handle.remove()


def _synthetic_requests(engine, length: int) -> list[Request]:
    vocab = engine.base.model.config.vocab_size
    prompt = [token % vocab for token in range(1, length + 1)]
    base = Request("warmup-base", prompt, None, SamplingParams(max_tokens=1, temperature=0))
    base.prompt_logprobs = []
    requests = [base]
    if engine.config.enable_lora:
        rank = engine.config.max_lora_rank
        adapter = LoraAdapter("warmup", rank, float(rank), False, [], {}, 0)  # no modules: the slot's zeros
        lora = Request("warmup-lora", prompt, adapter, SamplingParams(max_tokens=1, top_k=5, top_p=0.9))
        lora.slot = 0
        requests.append(lora)
    return requests


def check_model_runs(engine) -> None:
    """Prefill, decode and sample through every path once (see the module docstring).

    Raises:
        ModelLoadError: naming the phase, the innermost module that raised and the error.
    """
    allocator = engine.kv_cache.allocator
    length = max(1, min(PROMPT_TOKENS, engine.max_model_len - 1))
    requests = _synthetic_requests(engine, length)
    blocks = engine.kv_cache.blocks_needed(length + 1)
    if blocks * len(requests) > allocator.num_free:
        requests = requests[-1:]  # a cache this small holds one sequence at a time
    phase = "prefill"
    with _innermost_module(engine.base.model) as entered:
        try:
            for request in requests:
                request.block_table = allocator.allocate(blocks)
            logits, rows = engine.runner.run([ScheduledSeq(r, 0, length) for r in requests], engine.null_slot)
            picked = torch.tensor([rows.sample_rows[i] for i in range(len(requests))], device=logits.device)
            sampled = logits.index_select(0, picked)
            tokens = sample(sampled, [r.params for r in requests], _generators(requests, logits.device))
            token_logprobs(sampled.log_softmax(dim=-1), tokens, 2)
            for request, token in zip(requests, tokens.tolist()):
                request.output_ids.append(token)
            for strategy in engine.runner.ops.lora.variants:
                phase = f"decode with the {strategy} LoRA strategy"
                engine.runner.run([ScheduledSeq(r, length, 1) for r in requests], engine.null_slot, strategy)
        except Exception as exc:
            layer = entered[-1] if entered else "outside any module"
            raise ModelLoadError(
                f"the model cannot run on {engine.base.device} ({engine.base.quantize} quantization): {layer} raised "
                f"{type(exc).__name__}: {exc} during the start-up check ({phase})"
            ) from exc
        finally:
            for request in requests:
                allocator.free(request.block_table)


def _generators(requests: list[Request], device: torch.device) -> list[torch.Generator | None]:
    return [None if r.params.greedy else torch.Generator(device=device).manual_seed(0) for r in requests]

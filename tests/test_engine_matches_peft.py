"""The engine's greedy outputs equal PEFT's, request by request, whatever shares the batch.

PEFT's `generate`, run on each request alone with its adapter, is the oracle. In float32 the
tokens must be identical and every logit within 1e-4.
"""

import pytest
import torch

from conftest import ADAPTER_SPECS, PeftOracle
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import Completion, SamplingParams
from tiny import VOCAB_SIZE

MAX_NEW = 10
LOGIT_TOL = 1e-4

# Ten requests: every adapter, base-only requests, prompts of different lengths.
REQUESTS = [
    ("r4-qv", 5),
    (None, 12),
    ("r8-attn", 3),
    ("r16-mlp", 20),
    ("r8-all-rslora", 7),
    ("r4-patterns", 9),
    (None, 1),
    ("r16-mlp", 15),
    ("r4-qv", 31),
    ("r8-attn", 4),
]


def prompt_of(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist()


def logits_params() -> SamplingParams:
    # In raw_logits mode, top logprobs over the whole vocabulary carry the full logit vector.
    return SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, logprobs=VOCAB_SIZE)


def logits_of(completion) -> torch.Tensor:
    """[n, V] logits rebuilt from a completion's full-vocabulary top logprobs."""
    rows = torch.empty(len(completion.top_logprobs), VOCAB_SIZE)
    for i, alternatives in enumerate(completion.top_logprobs):
        for token, value in alternatives:
            rows[i, token] = value
    return rows


def make_engine(setup, quantize="none", **overrides) -> Engine:
    fields = dict(
        model=str(setup.model_dir),
        quantize=quantize,
        max_loras=8,
        max_lora_rank=16,
        logprobs_mode="raw_logits",
    )
    fields.update(overrides)
    engine = Engine(EngineConfig(**fields))
    for name, path in setup.adapter_dirs.items():
        engine.load_adapter(name, path)
    engine.prefetch()  # every run starts its requests together: the batches (and so the sums) are alike
    return engine


def assert_matches(oracle: PeftOracle, requests, prompts, completions, tol: float = LOGIT_TOL) -> None:
    """Tokens exactly PEFT's; logits within `tol` of PEFT's, relative to their largest magnitude (at least 1).

    Relative, because float32 rounding grows with the values summed: the kernels that oneDNN or
    Triton's interpreter pick on one CPU sum in another order than on the next, and a scaled adapter
    (rsLoRA: alpha / sqrt(r) = 4.2) moved the logits of a 6-magnitude row by 1.06e-4 on one EPYC
    and under 1e-4 on another. A real error (a wrong scaling, a missed module) moves them by 0.1 or more.
    """
    for (adapter, _), prompt, completion in zip(requests, prompts, completions, strict=True):
        tokens, logits = oracle.generate(prompt, adapter, MAX_NEW)
        assert completion.output_ids == tokens, f"adapter {adapter}: tokens differ from PEFT"
        diff = (logits_of(completion) - logits).abs().max().item()
        scale = max(1.0, logits.abs().max().item())
        assert diff <= tol * scale, f"adapter {adapter}: logits differ from PEFT by {diff} (largest logit {scale:.2f})"


def assert_mixed_batch_matches(setup, **overrides) -> None:
    """REQUESTS in one batch on an engine with `overrides`, each equal to PEFT alone."""
    engine = make_engine(setup, **overrides)
    prompts = [prompt_of(length, seed) for seed, (_, length) in enumerate(REQUESTS)]
    completions = engine.generate(prompts, [a for a, _ in REQUESTS], logits_params())
    assert_matches(PeftOracle(setup), REQUESTS, prompts, completions)


@pytest.mark.parametrize("linear_backend", ["auto", "reference"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_mixed_batch_equals_peft_per_request(tiny_setups, arch, linear_backend):
    """Both base linear backends: oneDNN-prepacked weights (the CPU default) and torch's linear."""
    assert_mixed_batch_matches(tiny_setups[arch], linear_backend=linear_backend)


@pytest.mark.parametrize("lora_strategy", ["dense", "gather", "segment"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_forced_lora_strategy_equals_peft(tiny_setups, arch, lora_strategy):
    """`auto` mixes strategies per layer; each one alone, on prefill and decode, gives PEFT's tokens."""
    assert_mixed_batch_matches(tiny_setups[arch], lora_strategy=lora_strategy)


def test_every_adapter_spec_is_in_the_mixed_batch():
    used = {adapter for adapter, _ in REQUESTS}
    assert set(ADAPTER_SPECS) <= used and None in used
    ranks = {ADAPTER_SPECS[a]["rank"] for a in used if a}
    assert {4, 8, 16} <= ranks


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_requests_joining_mid_decode_equal_peft(tiny_setups, arch):
    """Requests arrive while others are decoding; a small token budget forces chunked prefill."""
    setup = tiny_setups[arch]
    engine = make_engine(setup, max_num_batched_tokens=16, max_num_seqs=6)
    prompts = [prompt_of(length, 100 + seed) for seed, (_, length) in enumerate(REQUESTS)]
    events = {}
    order = []
    for index, ((adapter, _), prompt) in enumerate(zip(REQUESTS, prompts)):
        collected = []
        request_id = engine.add_request(prompt, adapter, logits_params(), sink=collected.append)
        events[request_id] = collected
        order.append(request_id)
        for _ in range(index % 3 + 1):  # a few steps pass before the next arrival
            engine.step()
    while engine.scheduler.has_work():
        engine.step()
    completions = [Completion.from_events(events[rid], prompt) for rid, prompt in zip(order, prompts)]
    assert_matches(PeftOracle(setup), REQUESTS, prompts, completions)


def test_output_does_not_depend_on_batch_company(llama):
    """The same request alone and inside a crowded mixed batch gives the same tokens and logits."""
    engine = make_engine(llama)
    target = prompt_of(11, 7)
    alone = engine.generate([target], ["r8-attn"], logits_params())[0]
    crowd = [prompt_of(n, 50 + n) for n in (3, 17, 8, 25)]
    together = engine.generate(
        crowd + [target], ["r16-mlp", None, "r4-qv", "r8-all-rslora", "r8-attn"], logits_params()
    )[-1]
    assert together.output_ids == alone.output_ids
    assert (logits_of(together) - logits_of(alone)).abs().max().item() <= LOGIT_TOL


def test_preemption_recomputes_without_changing_outputs(llama):
    """A KV cache too small for all requests forces preemption; outputs stay PEFT-exact."""
    engine = make_engine(llama, num_kv_blocks=6, block_size=8, max_num_seqs=4)
    requests = REQUESTS[:6]
    prompts = [prompt_of(length, 200 + seed) for seed, (_, length) in enumerate(requests)]
    completions = engine.generate(prompts, [a for a, _ in requests], logits_params())
    assert engine.scheduler.num_preemptions > 0
    assert_matches(PeftOracle(llama), requests, prompts, completions)


def test_nf4_base_equals_peft_on_same_nf4_base(llama):
    """Tokens identical; logits within 5e-2 (about 1% of their size here).

    bitsandbytes' CPU 4-bit kernel casts activations to bfloat16. Our LoRA delta differs from
    PEFT's by ~1e-6 (we fold the scaling into B, as vLLM does; PEFT multiplies afterwards), and such
    a difference can flip one bfloat16 rounding of a layer's input, which moves outputs by up to
    2^-8 of their size. Base-only requests, which share the exact kernels, match bit for bit.
    """
    engine = make_engine(llama, quantize="nf4")
    requests = REQUESTS[:6]
    prompts = [prompt_of(length, 300 + seed) for seed, (_, length) in enumerate(requests)]
    completions = engine.generate(prompts, [a for a, _ in requests], logits_params())
    assert_matches(PeftOracle(llama, "nf4"), requests, prompts, completions, tol=5e-2)


def test_int8_base_equals_peft_on_same_int8_base(llama):
    """Each request alone: tokens identical, logits within 1e-3.

    LLM.int8 rounds activations to float16 (the same ~1e-6 LoRA difference as for nf4 can flip a
    rounding). A mixed batch is checked in the next test: there exact agreement cannot hold at all.
    """
    engine = make_engine(llama, quantize="int8")
    oracle = PeftOracle(llama, "int8")
    requests = REQUESTS[:6]
    for seed, request in enumerate(requests):
        prompt = prompt_of(request[1], 300 + seed)
        completion = engine.generate([prompt], [request[0]], logits_params())
        assert_matches(oracle, [request], [prompt], completion, tol=1e-3)


def test_int8_mixed_batch_keeps_peft_tokens(llama):
    """Tokens identical; logits within 0.3 (about 5% of their size here).

    bitsandbytes' LLM.int8 sends a whole column through float16 when any row of the batch has an
    outlier there, so a request's logits depend on what shares its batch. This holds for any
    batched int8 server, PEFT's own mixed batches included.
    """
    engine = make_engine(llama, quantize="int8")
    requests = REQUESTS[:6]
    prompts = [prompt_of(length, 300 + seed) for seed, (_, length) in enumerate(requests)]
    completions = engine.generate(prompts, [a for a, _ in requests], logits_params())
    assert_matches(PeftOracle(llama, "int8"), requests, prompts, completions, tol=0.3)


def test_each_adapter_changes_the_output(llama):
    """The comparisons above are not vacuous: every adapter moves greedy tokens away from the base."""
    engine = make_engine(llama)
    prompt = prompt_of(8, 400)
    names = list(ADAPTER_SPECS)
    completions = engine.generate([prompt] * (len(names) + 1), [None, *names], logits_params())
    base_tokens = completions[0].output_ids
    for name, completion in zip(names, completions[1:]):
        assert completion.output_ids != base_tokens, f"adapter {name} left the output unchanged"

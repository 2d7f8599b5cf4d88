"""The engine on the Triton kernels (`--kernel-backend triton`) gives PEFT's greedy tokens, as the PyTorch ops do.

Here the kernels run under Triton's interpreter on CPU tensors (conftest.py turns it on without
CUDA), so every step of these engines goes through the paged-attention kernel and the SGMV/BGMV
LoRA kernels, and the tokens must be identical to PEFT's in float32, logits within 1e-4 of their scale: a mixed
batch (eagerly, and with decode steps replayed from graph buffers), chunked prefill with
preemption, a sliding window, and a live server answering the openai SDK. On a GPU the same checks run compiled in tests/test_gpu.py.
"""

import shutil

import openai
import pytest
import torch

from conftest import PeftOracle, build_setup
from live_server import LiveServer, server_config
from test_decode_graphs import with_graphs
from test_engine_matches_peft import (
    MAX_NEW,
    REQUESTS,
    assert_matches,
    logits_of,
    logits_params,
    make_engine,
    prompt_of,
)

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the compiled kernels are checked by test_gpu.py"),
]


# Interpreted kernels are slow: the first six requests, which hold every adapter spec and the base.
MIXED = REQUESTS[:6]
PROMPTS = [prompt_of(length, seed) for seed, (_, length) in enumerate(MIXED)]
ADAPTERS = [adapter for adapter, _ in MIXED]


@pytest.fixture(scope="module")
def eager_on_kernels(llama):
    """The mixed batch on the kernels, stepped eagerly (interpreted kernels are slow: computed once, read twice)."""
    return make_engine(llama, kernel_backend="triton").generate(PROMPTS, ADAPTERS, logits_params())


def test_mixed_batch_on_triton_kernels_equals_peft(llama, eager_on_kernels):
    assert_matches(PeftOracle(llama), MIXED, PROMPTS, eager_on_kernels)


def test_decode_steps_replayed_from_graph_buffers_equal_the_eager_steps_and_peft(llama, eager_on_kernels):
    """Six sequences replay from the 8-row bucket (two padding rows), every adapter and the base mixed.

    Off CUDA the graphs are `EagerReplay` stand-ins over the same static buffers as a CUDA graph
    (padding rows, scratch KV slot, full-rank LoRA routing, fixed-width block tables).
    """
    engine = make_engine(llama, kernel_backend="triton")
    graphs = with_graphs(engine, [2, 4, 8])
    replayed = engine.generate(PROMPTS, ADAPTERS, logits_params())
    assert graphs.replays >= MAX_NEW - 1  # every decode step after the prefill
    assert_matches(PeftOracle(llama), MIXED, PROMPTS, replayed)
    for ours, theirs in zip(replayed, eager_on_kernels, strict=True):
        assert ours.output_ids == theirs.output_ids
        assert (logits_of(ours) - logits_of(theirs)).abs().max().item() <= 1e-5


def test_chunked_prefill_and_preemption_on_triton_kernels_equal_peft(llama):
    """A 16-token budget cuts prompts into chunks that share steps with decodes; 6 blocks of 8 force preemption."""
    engine = make_engine(llama, kernel_backend="triton", max_num_batched_tokens=16, num_kv_blocks=6, block_size=8, max_num_seqs=4)
    requests = REQUESTS[:6]
    prompts = [prompt_of(length, 200 + seed) for seed, (_, length) in enumerate(requests)]
    completions = engine.generate(prompts, [a for a, _ in requests], logits_params())
    assert engine.scheduler.num_preemptions > 0
    assert_matches(PeftOracle(llama), requests, prompts, completions)


def test_sliding_window_on_triton_kernels_equals_peft(tmp_path):
    """A Mistral whose 8-token window is shorter than most prompts: the kernel must drop the keys behind it."""
    setup = build_setup(tmp_path, "mistral", seed=7, sliding_window=8)
    completions = make_engine(setup, kernel_backend="triton").generate(PROMPTS, ADAPTERS, logits_params())
    assert_matches(PeftOracle(setup), MIXED, PROMPTS, completions)


def test_server_on_triton_kernels_answers_the_openai_sdk_with_peft_tokens(llama, tmp_path, tokenizer):
    for name, path in llama.adapter_dirs.items():
        shutil.copytree(path, tmp_path / name)
    oracle = PeftOracle(llama)
    with LiveServer(server_config(llama.model_dir, tmp_path, kernel_backend="triton", max_loras=8, max_lora_rank=16)) as server:
        assert server.engine.kernel_backend == "triton"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for adapter, length in REQUESTS[:4]:
            prompt = prompt_of(length, 300 + length)
            expected, _ = oracle.generate(prompt, adapter, MAX_NEW)
            response = client.completions.create(
                model=adapter or "tiny-base", prompt=prompt, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True}
            )
            assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)

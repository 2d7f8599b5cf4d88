"""The engine on the Triton kernels (`--kernel-backend triton`) gives PEFT's greedy tokens, as the PyTorch ops do.

Here the kernels run under Triton's interpreter on CPU tensors (conftest.py turns it on without
CUDA), so every step of these engines goes through the paged-attention kernel and the SGMV/BGMV
LoRA kernels, and the tokens must be identical to PEFT's in float32, logits within 1e-4: mixed
batches on every architecture, chunked prefill, preemption, a sliding window, and a live server
answering the openai SDK. On a GPU the same checks run compiled in tests/test_gpu.py.
"""

import shutil

import openai
import pytest
import torch

from conftest import PeftOracle, build_setup
from live_server import LiveServer, server_config
from test_engine_matches_peft import MAX_NEW, REQUESTS, assert_matches, assert_mixed_batch_matches, logits_params, make_engine, prompt_of

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the compiled kernels are checked by test_gpu.py"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: per-head q/k norms, head_dim 16 apart from hidden / heads
def test_mixed_batch_on_triton_kernels_equals_peft(tiny_setups, arch):
    assert_mixed_batch_matches(tiny_setups[arch], kernel_backend="triton")


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
    assert_mixed_batch_matches(setup, kernel_backend="triton")


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

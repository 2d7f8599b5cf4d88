"""The GPU tier: the engine and the server on CUDA against PEFT on the same device, with stated tolerances.

Skipped without CUDA (`python -m pytest -m gpu` runs only these and the other gpu-marked tests;
`loadtest/gpu_check.sh` runs them on a lent GPU). The kernels' own tests run on CUDA too when it
is there: they pick the device themselves.
  * float32: greedy tokens identical to PEFT's, logits within 1e-3 (GPU GEMMs sum in another
    order than PEFT's batch-of-one calls; TF32 stays off), for both kernel backends;
  * bfloat16 and float16: each request's first-token logits within 0.1 of PEFT's on the same
    device and dtype (bf16 keeps 8 bits of mantissa: logits of magnitude ~5 move by ~0.02 per
    rounding), and the first greedy token equal for at least 9 of 10 requests (a near-tie may
    break either way);
  * nf4 and int8 bases (bitsandbytes on CUDA, float32 compute): tokens identical, logits within 1e-3;
  * CUDA graph replay of decode steps (`--cuda-graphs`): the eager step's tokens, logits within 1e-5.
"""

import shutil

import openai
import pytest
import torch

from conftest import PeftOracle
from live_server import LiveServer, server_config
from test_engine_matches_peft import MAX_NEW, REQUESTS, assert_matches, logits_of, logits_params, make_engine, prompt_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [prompt_of(length, seed) for seed, (_, length) in enumerate(REQUESTS)]
ADAPTERS = [adapter for adapter, _ in REQUESTS]


@pytest.mark.parametrize("kernel_backend", ["reference", "triton"])
def test_float32_mixed_batch_equals_peft_on_cuda(llama, kernel_backend):
    engine = make_engine(llama, device="cuda", dtype="float32", kernel_backend=kernel_backend)
    assert engine.kernel_backend == kernel_backend
    completions = engine.generate(PROMPTS, ADAPTERS, logits_params())
    assert_matches(PeftOracle(llama, device="cuda"), REQUESTS, PROMPTS, completions, tol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernel_backend", ["reference", "triton"])
def test_half_precision_first_token_logits_within_tolerance_of_peft(llama, kernel_backend, dtype):
    engine = make_engine(llama, device="cuda", dtype=dtype, kernel_backend=kernel_backend)
    completions = engine.generate(PROMPTS, ADAPTERS, logits_params())
    oracle = PeftOracle(llama, device="cuda", dtype=getattr(torch, dtype))
    same_first = 0
    for adapter, prompt, completion in zip(ADAPTERS, PROMPTS, completions, strict=True):
        tokens, logits = oracle.generate(prompt, adapter, 1)
        diff = (logits_of(completion)[0] - logits[0]).abs().max().item()
        assert diff <= 0.1, f"adapter {adapter}: first-token logits differ from PEFT {dtype} by {diff}"
        same_first += completion.output_ids[0] == tokens[0]
    assert same_first >= 9


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_equals_peft_on_the_same_quantized_base_on_cuda(llama, quantize):
    pytest.importorskip("bitsandbytes")
    engine = make_engine(llama, quantize=quantize, device="cuda", dtype="float32")
    completions = engine.generate(PROMPTS, ADAPTERS, logits_params())
    assert_matches(PeftOracle(llama, quantize, device="cuda"), REQUESTS, PROMPTS, completions, tol=1e-3)


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_server_on_cuda_answers_the_openai_sdk_with_peft_tokens(llama, tmp_path, tokenizer, engine_process):
    for name, path in llama.adapter_dirs.items():
        shutil.copytree(path, tmp_path / name)
    config = server_config(llama.model_dir, tmp_path, engine_process=engine_process, device="cuda", max_loras=8, max_lora_rank=16)
    oracle = PeftOracle(llama, device="cuda")
    with LiveServer(config) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for adapter, prompt in zip(ADAPTERS[:4], PROMPTS[:4]):
            expected, _ = oracle.generate(prompt, adapter, MAX_NEW)
            response = client.completions.create(
                model=adapter or "tiny-base", prompt=prompt, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True}
            )
            assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_cuda_graph_replay_equals_the_eager_step_and_peft(llama):
    """Every decode step replayed from a captured graph, the LoRA path included (SGLang#32703 lost it)."""
    eager = make_engine(llama, device="cuda", dtype="float32").generate(PROMPTS, ADAPTERS, logits_params())
    engine = make_engine(llama, device="cuda", dtype="float32", cuda_graphs=True)
    replayed = engine.generate(PROMPTS, ADAPTERS, logits_params())
    assert engine.runner.graphs.replays >= MAX_NEW - 1
    assert_matches(PeftOracle(llama, device="cuda"), REQUESTS, PROMPTS, replayed, tol=1e-3)
    for ours, theirs in zip(replayed, eager, strict=True):
        assert ours.output_ids == theirs.output_ids
        assert (logits_of(ours) - logits_of(theirs)).abs().max().item() <= 1e-5

"""Decode graphs: which steps replay, which fall back to the eager step, and where they are refused.

Without a GPU the graphs are `EagerReplay` stand-ins: the same static input buffers, padding rows,
scratch KV slot, fixed full-rank LoRA routing and fixed-width block tables as a CUDA graph, run
eagerly through the Triton kernels (under the interpreter). Replay against the eager step and
PEFT is in tests/test_engine_kernels.py; that the CUDA capture itself records every kernel,
tests/test_gpu.py checks on a GPU.
"""

import pytest
import torch

from conftest import PeftOracle
from loraplex.config import EngineConfig
from loraplex.engine.decode_graphs import DecodeGraphs, bucket_sizes
from test_engine_matches_peft import REQUESTS, assert_matches, logits_params, make_engine, prompt_of

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the real graphs are checked by test_gpu.py"),
]

PROMPTS = [prompt_of(length, seed) for seed, (_, length) in enumerate(REQUESTS)][:3]
ADAPTERS = [adapter for adapter, _ in REQUESTS][:3]


def with_graphs(engine, sizes):
    engine.runner.graphs = DecodeGraphs(
        engine.runner, sizes, engine.null_slot, engine.config.max_lora_rank, engine.kv_cache.scratch_slot, engine.max_model_len
    )
    return engine.runner.graphs


def test_steps_past_the_largest_bucket_and_prefills_run_eagerly(llama):
    engine = make_engine(llama, kernel_backend="triton")
    graphs = with_graphs(engine, [1, 2])
    completions = engine.generate(PROMPTS, ADAPTERS, logits_params())
    assert graphs.replays == 0  # three sequences decode together: no bucket holds them
    assert_matches(PeftOracle(llama), REQUESTS[:3], PROMPTS, completions)
    engine.generate(PROMPTS[:2], ADAPTERS[:2], logits_params())
    assert graphs.replays > 0


def test_bucket_sizes_cover_every_batch_up_to_max_num_seqs():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(48)[-2:] == [32, 48]


def test_cuda_graphs_are_refused_where_they_cannot_be_captured():
    with pytest.raises(ValueError, match="--cuda-graphs captures the Triton kernels on CUDA"):
        EngineConfig(model="unused", device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="--cuda-graphs"):
        EngineConfig(model="unused", kernel_backend="reference", cuda_graphs=True)

"""The KV cache's size: explicit blocks, a byte budget, free GPU memory, or max_num_seqs sequences.

The rule is tested as arithmetic (the CUDA branch with the device's size and the profiling
step's peak stubbed, since this machine has no GPU) and through a real engine, whose cache and
start-up line must say what the rule decided.
"""

import pytest
import torch

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.kv_sizing import GIB, block_bytes, blocks_from_free_memory, size_kv_cache
from loraplex.errors import ModelLoadError

PER_BLOCK = block_bytes(num_layers=2, block_size=16, kv_heads=2, head_dim=16, dtype=torch.float32)


def config(**fields) -> EngineConfig:
    return EngineConfig(model="unused", block_size=16, max_num_seqs=4, **fields)


def test_one_block_holds_k_and_v_of_every_layer():
    assert PER_BLOCK == 2 * 2 * 16 * 2 * 16 * 4
    assert block_bytes(32, 16, 8, 128, torch.bfloat16) == 2 * 32 * 16 * 8 * 128 * 2  # Llama-3-8B: 2 MiB a block


@pytest.mark.parametrize(
    ("total", "used", "utilization", "expected"),
    [
        (100 * GIB, 20 * GIB, 0.9, 70),
        (100 * GIB, 20 * GIB, 1.0, 80),
        (100 * GIB, 95 * GIB, 0.9, 0),  # the weights alone pass the budget: nothing left, never negative
    ],
)
def test_free_memory_rule(total, used, utilization, expected):
    assert blocks_from_free_memory(total, used, utilization, GIB) == expected


def test_explicit_blocks_win_over_every_budget():
    sizing = size_kv_cache(config(num_kv_blocks=7, kv_cache_bytes=1 << 30), 64, PER_BLOCK, torch.device("cpu"))
    assert (sizing.num_blocks, sizing.rule) == (7, "--num-kv-blocks")


def test_byte_budget_on_cpu():
    sizing = size_kv_cache(config(kv_cache_bytes=10 * PER_BLOCK + 1), 64, PER_BLOCK, torch.device("cpu"))
    assert sizing.num_blocks == 10
    assert "--kv-cache-bytes" in sizing.summary(64)


def test_cpu_default_holds_max_num_seqs_full_sequences():
    sizing = size_kv_cache(config(), 100, PER_BLOCK, torch.device("cpu"))
    assert sizing.num_blocks == 4 * 7  # ceil(100 / 16) blocks for each of 4 sequences
    assert sizing.summary(100).startswith("28 blocks of 16 tokens")


def test_a_budget_below_one_sequence_is_refused_naming_it():
    with pytest.raises(ModelLoadError, match="fewer than one sequence of max_model_len 64 needs"):
        size_kv_cache(config(kv_cache_bytes=PER_BLOCK), 64, PER_BLOCK, torch.device("cpu"))


def test_cuda_takes_what_the_utilization_leaves_after_the_profiled_peak(monkeypatch):
    class Properties:
        total_memory = 1000 * PER_BLOCK

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    sizing = size_kv_cache(config(gpu_memory_utilization=0.5), 64, PER_BLOCK, torch.device("cuda"), lambda: 200 * PER_BLOCK)
    assert sizing.num_blocks == 300
    assert "--gpu-memory-utilization 0.5" in sizing.rule


def test_cuda_with_a_byte_budget_does_not_profile():
    def profile():
        raise AssertionError("a byte budget needs no profiling step")

    sizing = size_kv_cache(config(kv_cache_bytes=8 * PER_BLOCK), 64, PER_BLOCK, torch.device("cuda"), profile)
    assert sizing.num_blocks == 8


def test_engine_allocates_what_the_budget_holds_and_says_so(llama):
    layout = block_bytes(2, 8, 2, 16, torch.float32)  # tiny.py's llama: 2 layers, 2 KV heads of 16
    engine = Engine(EngineConfig(model=str(llama.model_dir), block_size=8, max_model_len=64, kv_cache_bytes=20 * layout))
    assert engine.kv_cache.allocator.num_blocks == 20
    assert engine.kv_cache.keys[0].shape == (21 * 8, 2, 16)  # and one scratch block, for padding rows of captured steps
    assert engine.kv_summary.startswith("20 blocks of 8 tokens")

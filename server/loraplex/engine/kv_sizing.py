"""How many KV-cache blocks the engine allocates, and the line that says so at start-up.

Owns: the bytes of one block, the sizing rule, and the profiling step that measures what a step
needs on CUDA besides the cache. The rule, first match wins:
  1. `num_kv_blocks`, when given;
  2. on CUDA without `kv_cache_bytes`, what `gpu_memory_utilization` of the device leaves after
     the weights, the adapter slots and the peak of a profiling step of `max_num_batched_tokens`
     tokens (vLLM's rule);
  3. otherwise `EngineConfig.kv_blocks`: a byte budget, `kv_cache_bytes`, or enough for
     `max_num_seqs` sequences of `max_model_len`.
It must not allocate the cache itself (kv_cache.py does) nor change the model.
"""

from dataclasses import dataclass

import torch

from loraplex.config import EngineConfig
from loraplex.errors import ModelLoadError

GIB = 1 << 30


def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of `block_size` tokens in every layer."""
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_from_free_memory(total_bytes: int, used_bytes: int, utilization: float, bytes_per_block: int) -> int:
    """Blocks that fit in `utilization` of the device once `used_bytes` (weights, slots, a step's peak) are taken.

    >>> blocks_from_free_memory(100 * GIB, 20 * GIB, 0.9, GIB)
    70
    """
    return max(0, int(total_bytes * utilization) - used_bytes) // bytes_per_block


@dataclass(frozen=True)
class KVSizing:
    """The cache the engine allocates, and why that size."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    rule: str  # which rule of the module docstring decided it

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def summary(self, max_model_len: int) -> str:
        """The start-up line: blocks, bytes, tokens, full-length sequences, and the rule."""
        gib = self.num_blocks * self.bytes_per_block / GIB
        return (
            f"{self.num_blocks:,} blocks of {self.block_size} tokens ({gib:.2f} GiB): {self.tokens:,} tokens, "
            f"{self.tokens // max_model_len:,} sequences of {max_model_len} ({self.rule})"
        )


def size_kv_cache(
    config: EngineConfig, max_model_len: int, bytes_per_block: int, device: torch.device, profile_peak=None
) -> KVSizing:
    """The block count by the module docstring's rule.

    Args:
        config: `num_kv_blocks`, `kv_cache_bytes`, `gpu_memory_utilization`, `max_num_seqs`, `block_size`.
        max_model_len: tokens of one sequence.
        bytes_per_block: from `block_bytes`.
        device: where the cache goes.
        profile_peak: on CUDA, a callable running the profiling step and returning the bytes in use
            at its peak (torch's allocator plus what other processes and the CUDA context hold).

    Raises:
        ModelLoadError: the budget holds no block, or not one sequence of `max_model_len`.
    """
    if config.num_kv_blocks is not None:
        return KVSizing(config.num_kv_blocks, config.block_size, bytes_per_block, "--num-kv-blocks")
    if config.kv_cache_bytes is None and device.type == "cuda" and profile_peak is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        used = profile_peak()
        num_blocks = blocks_from_free_memory(total, used, config.gpu_memory_utilization, bytes_per_block)
        rule = (
            f"--gpu-memory-utilization {config.gpu_memory_utilization} of {total / GIB:.1f} GiB, "
            f"{used / GIB:.2f} GiB in use at the profiling step's peak"
        )
    else:
        num_blocks = config.kv_blocks(max_model_len, bytes_per_block)
        rule = f"--kv-cache-bytes {config.kv_cache_bytes:,}" if config.kv_cache_bytes else f"{config.max_num_seqs} sequences"
    needed = -(-max_model_len // config.block_size)
    if num_blocks < needed:
        raise ModelLoadError(
            f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens ({rule}), fewer than one sequence of "
            f"max_model_len {max_model_len} needs ({needed}): give it more memory or lower --max-model-len"
        )
    return KVSizing(num_blocks, config.block_size, bytes_per_block, rule)


def profile_peak_bytes(run_step, cache_bytes: int, device: torch.device) -> int:
    """Bytes in use on a CUDA device at the peak of `run_step()`, less the `cache_bytes` of its probe cache.

    Counts torch's peak allocation plus what torch does not allocate (the CUDA context, other
    processes), so the cache sized from it leaves room for the largest step.
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache_bytes
    free, total = torch.cuda.mem_get_info(device)
    outside = total - free - torch.cuda.memory_reserved(device)
    return peak + outside

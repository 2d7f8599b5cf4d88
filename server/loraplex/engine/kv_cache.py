"""The paged KV cache: fixed-size blocks in per-layer tensors, and the allocator handing them out.

Owns: the K and V tensors of every layer, shaped `[(num_blocks + 1) * block_size, kv_heads, head_dim]`
(a flat view of `[num_blocks + 1, block_size, ...]`, so a token's cache slot is `block * block_size +
offset`), and the free list of blocks. Sequences of any length and position share a step because
each one reads its context through its own block table. What a sequence owns is the scheduler's
business; this module only counts blocks. Blocks holding a cached prefix are the prefix cache's
(prefix_cache.py): the allocator counts its idle ones as free and takes them, least recently
used first, only when its own free list is empty.
"""

import torch

from loraplex.engine.prefix_cache import PrefixCache


class BlockAllocator:
    """A free list of KV blocks, beside the prefix cache's reusable ones."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self.prefix_cache = PrefixCache()

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: never-cached free ones and cached ones nobody holds."""
        return len(self._free) + self.prefix_cache.num_idle

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks with {self.num_free} free")
        taken = min(count, len(self._free))
        return [self._free.pop() for _ in range(taken)] + self.prefix_cache.evict(count - taken)

    def free(self, blocks: list[int]) -> None:
        """A block table lets `blocks` go: cached ones stay cached (idle once nobody holds them)."""
        self._free.extend(reversed(self.prefix_cache.release(blocks)))

    def forget(self, blocks: list[int]) -> None:
        """Uncache `blocks`, whose K/V cannot be trusted (a failed request wrote them)."""
        self._free.extend(reversed(self.prefix_cache.forget(blocks)))

    @property
    def usage(self) -> float:
        """The fraction of blocks held by requests (idle cached blocks count as free, as vLLM counts them)."""
        return 1.0 - self.num_free / self.num_blocks


class KVCache:
    """Per-layer K and V storage for `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        # One block more than the allocator hands out: padding rows of a captured decode step write there.
        self.scratch_slot = num_blocks * block_size
        shape = ((num_blocks + 1) * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, block_table: list[int], position: int) -> int:
        """The flat cache index of the token at `position` of a sequence."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

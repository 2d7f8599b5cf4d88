"""Decode steps replayed from graphs captured once per bucketed batch size (`--cuda-graphs`).

Owns: each bucket's static inputs (token ids, positions, cache slots, the attention kernel's query
starts, context lengths and block tables, the LoRA kernels' routing), capturing one graph per
bucket at start-up, and the replay that writes a decode step into the smallest bucket that holds
it and returns its logits. What a step cannot change between replays is fixed at capture: every
row is one query, the block tables are `max_model_len` wide, and the LoRA kernels run on every
bucket with the stacks' full rank (BGMV), reading each token's own rank and slot from the device,
so the LoRA path is in the graph whatever adapters a step mixes. A padding row decodes token 0
on the null slot into a scratch KV block that no sequence owns, and its logits are dropped.

Only the Triton backend's ops are captured (they never synchronize and size every grid from host
ints fixed here). On CUDA a bucket is a `torch.cuda.CUDAGraph`; elsewhere `EagerReplay` runs the
same static-input forward eagerly, which is how replay is proven equal to the eager step without
a GPU. It must not capture prefill or prompt-logprob rows (they fall back to the eager step).
"""

from dataclasses import dataclass

import torch

from loraplex.engine.ops.backend import TritonAttentionBatch
from loraplex.engine.ops.lora_triton import LoraKernelBatch
from loraplex.engine.runner import ModelRunner, StepLists


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two up to `max_num_seqs`, and `max_num_seqs` itself.

    >>> bucket_sizes(48)
    [1, 2, 4, 8, 16, 32, 48]
    """
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return [*sizes, max_num_seqs]


class EagerReplay:
    """A graph stand-in off CUDA: `capture` keeps the forward, `replay` runs it again on the same buffers."""

    def __init__(self):
        self._forward = None

    def capture(self, forward) -> torch.Tensor:
        self._forward = forward
        return forward()

    def replay(self) -> torch.Tensor:
        return self._forward()


class CudaReplay:
    """One CUDA graph; buckets share a memory pool, captured largest first."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.output: torch.Tensor | None = None

    def capture(self, forward) -> torch.Tensor:
        forward()  # compile the kernels and settle the allocator outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = forward()
        return self.output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


@dataclass
class Bucket:
    """One batch size's static inputs, its captured graph and the logits it writes."""

    size: int
    longs: torch.Tensor  # [3 * size]: token ids, positions, cache slots
    ints: torch.Tensor  # [2 * size + size * max_blocks + num_slots]: seq lens, block tables, token slots, slot ranks
    host_longs: torch.Tensor  # staging copies of the two, pinned on CUDA
    host_ints: torch.Tensor
    replay: EagerReplay | CudaReplay
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Captured decode steps for batches of up to `max(sizes)` sequences.

    Args:
        runner: the engine's runner, on the Triton backend.
        sizes: the buckets (`bucket_sizes`).
        null_slot: the LoRA null slot (`max_loras`).
        max_lora_rank: the stacks' rank (every bucket runs the kernels at it).
        scratch_slot: the first cache slot of a block no sequence owns (padding rows write there).
        max_model_len: tokens of a sequence, for the block tables' width.
    """

    def __init__(self, runner: ModelRunner, sizes: list[int], null_slot: int, max_lora_rank: int, scratch_slot: int, max_model_len: int):
        if runner.ops.name != "triton":
            raise ValueError("decode graphs capture the Triton kernels; this engine runs the reference ops")
        self.runner = runner
        self.null_slot = null_slot
        self.max_lora_rank = max_lora_rank
        self.scratch_slot = scratch_slot
        self.block_size = runner.kv_cache.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        device = runner.device
        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.replays = 0  # steps served from a graph (tests and the GPU check read it)
        self.buckets: dict[int, Bucket] = {}
        for size in sorted(sizes, reverse=True):
            replay = CudaReplay(pool) if device.type == "cuda" else EagerReplay()
            self.buckets[size] = self._capture(size, replay)

    def covers(self, lists: StepLists) -> bool:
        """A decode step: one new token per sequence, each sampled, no prompt logprobs; at most the largest bucket."""
        count = len(lists.token_ids)
        return count <= max(self.buckets) and len(lists.spans) == count and lists.logit_tokens == list(range(count))

    def replay(self, lists: StepLists) -> torch.Tensor:
        """[n, V] logits of a decode step's n sequences (`lists` from `ModelRunner.step_lists`), from its bucket's graph."""
        count = len(lists.token_ids)
        bucket = self.buckets[min(size for size in self.buckets if size >= count)]
        self._fill(bucket, lists)
        self.replays += 1
        return bucket.replay.replay()[:count]

    def _fill(self, bucket: Bucket, lists: StepLists) -> None:
        padding = bucket.size - len(lists.token_ids)
        scratch_block = self.scratch_slot // self.block_size
        longs = [*lists.token_ids, *[0] * padding, *lists.positions, *[0] * padding, *lists.slot_mapping, *[self.scratch_slot] * padding]
        tables = []
        for span in lists.spans:
            used = span.block_table[: -(-(span.start + 1) // self.block_size)]
            tables += used + [scratch_block] * (self.max_blocks - len(used))
        tables += [scratch_block] * (self.max_blocks * padding)
        seq_lens = [span.start + 1 for span in lists.spans] + [1] * padding
        ranks = [0] * (self.null_slot + 1)
        for slot, rank in lists.slot_ranks.items():
            ranks[slot] = rank
        ints = [*seq_lens, *tables, *lists.token_slots, *[self.null_slot] * padding, *ranks]
        # Reusing the staging buffers is safe: the previous step's sampled ids were read back, so its copies are done.
        bucket.host_longs.copy_(torch.tensor(longs, dtype=torch.long))
        bucket.host_ints.copy_(torch.tensor(ints, dtype=torch.int32))
        bucket.longs.copy_(bucket.host_longs, non_blocking=True)
        bucket.ints.copy_(bucket.host_ints, non_blocking=True)

    def _capture(self, size: int, replay) -> Bucket:
        device = self.runner.device
        num_slots = self.null_slot + 1
        longs = torch.zeros(3 * size, dtype=torch.long, device=device)
        ints = torch.zeros(2 * size + size * self.max_blocks + num_slots, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        bucket = Bucket(size, longs, ints, torch.zeros_like(longs, device="cpu", pin_memory=pin),
                        torch.zeros_like(ints, device="cpu", pin_memory=pin), replay)  # fmt: skip
        token_ids, positions, slot_mapping = longs.view(3, size)
        seq_lens = ints[:size]
        block_tables = ints[size : size + size * self.max_blocks].view(size, self.max_blocks)
        token_slots = ints[size + size * self.max_blocks : 2 * size + size * self.max_blocks]
        slot_ranks = ints[2 * size + size * self.max_blocks :]
        steps = torch.arange(size + 1, dtype=torch.int32, device=device)  # one query per row
        attention = TritonAttentionBatch(
            slot_mapping=slot_mapping, query_starts=steps, seq_lens=seq_lens, block_tables=block_tables,
            max_query_len=1, block_size=self.block_size, sliding_window=self.runner.sliding_window,
        )  # fmt: skip
        lora = LoraKernelBatch(
            token_slots=token_slots, slot_ranks=slot_ranks, seg_starts=steps, seg_slots=token_slots,
            max_seg_len=1, max_rank=self.max_lora_rank, num_tokens=size, variant="bgmv",
        )  # fmt: skip
        rows = torch.arange(size, dtype=torch.long, device=device)
        self._fill(bucket, StepLists())  # every row padding: a valid step to capture
        bucket.logits = replay.capture(lambda: self.runner.logits(token_ids, positions, rows, attention, lora))
        return bucket

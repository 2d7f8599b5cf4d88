"""The batched LoRA delta: one function, many adapters, one step.

Owns: the per-step routing metadata (`LoraBatch`, built once per step and read by every wrapped
layer) and `add_lora_delta`, the pure-PyTorch op that a CUDA kernel can later replace. Semantics,
for every token t of the step whose request sits in slot s = token_slots[t]:

    y[t] += (x[t] @ lora_a[s].T) @ lora_b[s]     # scaling is folded into lora_b at slot load

A token of a base-only request points at the null slot, whose stacks are all zeros. `lora_b` is
stored slot-major and transposed, `[slots, rank, out]`: slot s's B.T is one contiguous block (a
gather copies whole rows, about 4x faster on CPU than gathering from an out-major stack), and the
whole stack is also one `[slots * rank, out]` matrix.

Three equivalent strategies, picked per layer width (the cheapest by `strategy_cost`):
  * dense: multiply by every slot of the step's slot range [0, hi) at once and zero each token's
    other slots' columns: three ops, with flops growing with T x hi. Best for decode steps over a
    few low slots, where the cost is in the number of ops, not in flops.
  * gather (BGMV-like): gather each token's A and B, then two batched matmuls: three ops, with
    copies growing with T x rank x (in + out). Best for many slots on narrow layers.
  * segment (SGMV-like): tokens are ordered by slot, so each adapter is a contiguous segment; two
    matmuls per segment, each adapter's weights read once. Best for prefill, where segments are
    long, and for decode over many slots on wide layers, where gathering would copy too much.
"""

from dataclasses import dataclass, field

import torch

# The cost model behind `auto`, in units of one LoRA element gathered (about 0.6 ns on the 2-core
# EPYC it was fitted on: fp32, one thread; `python -m loadtest.lora_strategies` checks it).
OP_OVERHEAD = 16_000  # an op's fixed cost (dispatch, oneDNN set-up)
SEGMENT_READ = 0.2  # an element read by a matmul, against one gathered (copied)
DENSE_FLOP = 1 / 15  # an element multiplied through by the dense strategy for one token


def strategy_cost(strategy: str, tokens: int, segments: int, slot_range: int, rank: int, max_rank: int, width: int) -> float:
    """What one layer's delta costs under `strategy`, in gathered LoRA elements.

    Args:
        strategy: dense, gather or segment.
        tokens: T, the step's tokens.
        segments: the adapter runs among them.
        slot_range: hi, the highest adapter slot of the step + 1.
        rank: the step's largest rank (what gather and segment slice the stacks to).
        max_rank: the stacks' rank (what dense multiplies through).
        width: the layer's in + out features.

    >>> strategy_cost("segment", 16, 12, 64, 16, 16, 5120) < strategy_cost("gather", 16, 12, 64, 16, 16, 5120)
    True
    """
    if strategy == "gather":
        return 2 * OP_OVERHEAD + tokens * rank * width
    if strategy == "segment":
        return segments * (2 * OP_OVERHEAD + SEGMENT_READ * rank * width)
    return 2 * OP_OVERHEAD + DENSE_FLOP * tokens * slot_range * max_rank * width


@dataclass
class LoraBatch:
    """How the tokens of one step map to LoRA slots; shared by every wrapped layer."""

    token_slots: torch.Tensor  # [T] long: each token's slot, the null slot for base-only tokens
    segments: list[tuple[int, int, int, int]]  # (slot, start, end, rank) of each adapter run of tokens
    rank: int  # the largest rank in the step: stacks are sliced to it
    max_rank: int  # the stacks' rank
    slot_range: int  # hi: every adapter slot of the step is below it
    strategy: str  # one of STRATEGIES; `auto` lets each layer width pick by `strategy_cost`
    chosen: dict[int, str] = field(default_factory=dict)  # layer width -> the strategy picked for it
    dense_mask: torch.Tensor | None = None  # [T, hi * max_rank] bool, built when dense is first used

    def strategy_for(self, width: int) -> str:
        """The strategy for a layer of `width` = in + out features, decided once per width per step."""
        if self.strategy != "auto":
            return self.strategy
        if width not in self.chosen:
            tokens, segments = len(self.token_slots), len(self.segments)
            costs = {
                name: strategy_cost(name, tokens, segments, self.slot_range, self.rank, self.max_rank, width)
                for name in ("dense", "gather", "segment")
            }
            self.chosen[width] = min(costs, key=costs.get)
        return self.chosen[width]

    def dense_other(self) -> torch.Tensor:
        """[T, hi * max_rank] bool: True off each token's own slot columns (what dense zeroes)."""
        if self.dense_mask is None:
            column_slot = torch.arange(self.slot_range, device=self.token_slots.device)
            column_slot = column_slot.repeat_interleave(self.max_rank)  # [hi * R]
            self.dense_mask = column_slot[None, :] != self.token_slots[:, None]  # [T, hi * R]
        return self.dense_mask


def find_segments(token_slots: list[int], slot_ranks: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """Runs of equal slots in token order, skipping slots absent from `slot_ranks` (the null slot).

    >>> find_segments([2, 2, 9, 0, 0, 0], {2: 8, 0: 4})
    [(2, 0, 2, 8), (0, 3, 6, 4)]
    """
    segments = []
    start = 0
    for index in range(1, len(token_slots) + 1):
        if index == len(token_slots) or token_slots[index] != token_slots[start]:
            slot = token_slots[start]
            if slot in slot_ranks:
                segments.append((slot, start, index, slot_ranks[slot]))
            start = index
    return segments


STRATEGIES = ("auto", "dense", "gather", "segment")


def build_lora_batch(
    token_slots: list[int],
    slot_ranks: dict[int, int],
    max_rank: int,
    device: torch.device,
    strategy: str = "auto",
) -> LoraBatch | None:
    """The step's LoRA metadata, or None when no token of the step uses an adapter.

    Args:
        token_slots: the slot of every token of the step, in the step's token order.
        slot_ranks: the rank of each slot used by an adapter this step (the null slot is absent).
        max_rank: the stacks' rank (`max_lora_rank`).
        device: where the forward runs.
        strategy: one of STRATEGIES; `auto` lets each layer width pick the cheapest, the others
            force one everywhere (the start-up check runs each).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LoRA strategy {strategy!r}; expected one of {STRATEGIES}")
    segments = find_segments(token_slots, slot_ranks)
    if not segments:
        return None
    return LoraBatch(
        token_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
        segments=segments,
        rank=max(slot_ranks.values()),
        max_rank=max_rank,
        slot_range=max(slot_ranks) + 1,
        strategy=strategy,
    )


def add_lora_delta(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch) -> None:
    """Add every token's LoRA delta to `y`, in place.

    Args:
        y: [T, out] the base layer's output.
        x: [T, in] the layer's input.
        lora_a: [S + 1, R, in] slot stack of A matrices (last slot: null).
        lora_b: [S + 1, R, out] slot stack of transposed B matrices, pre-multiplied by each adapter's
            scaling.
        batch: the step's routing metadata.
    """
    if x.dtype != lora_a.dtype or y.dtype != lora_a.dtype:
        delta = torch.zeros(y.shape, dtype=lora_a.dtype, device=y.device)
        add_lora_delta(delta, x.to(lora_a.dtype), lora_a, lora_b, batch)
        y += delta.to(y.dtype)
        return
    strategy = batch.strategy_for(x.shape[-1] + y.shape[-1])
    if strategy == "segment":
        for slot, start, end, rank in batch.segments:
            shrunk = x[start:end] @ lora_a[slot, :rank].T  # [n, r]
            y[start:end].addmm_(shrunk, lora_b[slot, :rank])
        return
    if strategy == "dense":
        dense_other = batch.dense_other()
        columns = dense_other.shape[1]  # hi * R
        shrunk = x @ lora_a.view(-1, lora_a.shape[2])[:columns].T  # [T, hi * R]
        # Zero other slots' columns by selection, not by multiplying with 0: an Inf there stays out.
        shrunk.masked_fill_(dense_other, 0.0)
        y.addmm_(shrunk, lora_b.view(-1, lora_b.shape[2])[:columns])
        return
    rank = batch.rank
    a = lora_a[:, :rank].index_select(0, batch.token_slots)  # [T, r, in]
    shrunk = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))  # [T, 1, r]
    b = lora_b[:, :rank].index_select(0, batch.token_slots)  # [T, r, out]
    y.unsqueeze(1).baddbmm_(shrunk, b)  # y: [T, 1, out]

"""The batched LoRA delta: one function, many adapters, one step.

Owns: the per-step routing metadata (`LoraBatch`, built once per step and read by every wrapped
layer) and `add_lora_delta`, the pure-PyTorch op that a CUDA kernel can later replace. Semantics,
for every token t of the step whose request sits in slot s = token_slots[t]:

    y[t] += (x[t] @ lora_a[s].T) @ lora_b[s]     # scaling is folded into lora_b at slot load

A token of a base-only request points at the null slot, whose stacks are all zeros. `lora_b` is
stored slot-major and transposed, `[slots, rank, out]`: slot s's B.T is one contiguous block (a
gather copies whole rows, about 4x faster on CPU than gathering from an out-major stack), and the
whole stack is also one `[slots * rank, out]` matrix.

Three equivalent strategies, picked per step:
  * dense: when the step's slots all lie in a small range [0, hi), multiply by every slot of the
    range at once and zero each token's other slots' columns: three ops per layer. Best for
    decode steps with few adapters, where the cost is in the number of ops, not in flops.
  * gather (BGMV-like): gather each token's A and B, then two batched matmuls. For decode steps
    over many slots.
  * segment (SGMV-like): tokens are ordered by slot, so each adapter is a contiguous segment; two
    matmuls per segment. Best for prefill, where segments are long.
"""

from dataclasses import dataclass

import torch

# Average tokens per adapter segment from which the segment strategy beats the others.
SEGMENT_MIN_AVG_TOKENS = 16
# Widest slot range (slots x max rank columns) the dense strategy multiplies through.
DENSE_MAX_COLUMNS = 256


@dataclass
class LoraBatch:
    """How the tokens of one step map to LoRA slots; shared by every wrapped layer."""

    token_slots: torch.Tensor  # [T] long: each token's slot, the null slot for base-only tokens
    segments: list[tuple[int, int, int, int]]  # (slot, start, end, rank) of each adapter run of tokens
    rank: int  # the largest rank in the step: stacks are sliced to it
    use_segments: bool
    dense_other: torch.Tensor | None  # [T, hi * max_rank] bool, True off each token's own slot columns


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
        strategy: one of STRATEGIES; `auto` picks by tokens per segment and slot range, the others
            force one (the start-up check runs each).
    """
    segments = find_segments(token_slots, slot_ranks)
    if not segments:
        return None
    slots = torch.tensor(token_slots, dtype=torch.long, device=device)
    hi = max(slot_ranks) + 1
    if strategy == "auto":
        if len(token_slots) >= SEGMENT_MIN_AVG_TOKENS * len(segments):
            strategy = "segment"
        else:
            strategy = "dense" if hi * max_rank <= DENSE_MAX_COLUMNS else "gather"
    dense_other = None
    if strategy == "dense":
        column_slot = torch.arange(hi, device=device).repeat_interleave(max_rank)  # [hi * R]
        dense_other = column_slot[None, :] != slots[:, None]  # [T, hi * R]
    return LoraBatch(
        token_slots=slots,
        segments=segments,
        rank=max(slot_ranks.values()),
        use_segments=strategy == "segment",
        dense_other=dense_other,
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
    if batch.use_segments:
        for slot, start, end, rank in batch.segments:
            shrunk = x[start:end] @ lora_a[slot, :rank].T  # [n, r]
            y[start:end].addmm_(shrunk, lora_b[slot, :rank])
        return
    if batch.dense_other is not None:
        columns = batch.dense_other.shape[1]  # hi * R
        shrunk = x @ lora_a.view(-1, lora_a.shape[2])[:columns].T  # [T, hi * R]
        # Zero other slots' columns by selection, not by multiplying with 0: an Inf there stays out.
        shrunk.masked_fill_(batch.dense_other, 0.0)
        y.addmm_(shrunk, lora_b.view(-1, lora_b.shape[2])[:columns])
        return
    rank = batch.rank
    a = lora_a[:, :rank].index_select(0, batch.token_slots)  # [T, r, in]
    shrunk = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))  # [T, 1, r]
    b = lora_b[:, :rank].index_select(0, batch.token_slots)  # [T, r, out]
    y.unsqueeze(1).baddbmm_(shrunk, b)  # y: [T, 1, out]

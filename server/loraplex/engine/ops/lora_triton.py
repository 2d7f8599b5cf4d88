"""Triton kernels for the batched LoRA delta: shrink (x @ A.T) and expand (@ B) over the slot stacks.

Owns: `LoraKernelBatch`, the step's routing as int32 device tensors plus the host ints that size
every grid (built once per step by `build_kernel_batch`), and two kernel pairs that compute, for
each token t in slot s = token_slots[t] with rank r = slot_ranks[s], and each member m of a group
of projections that share x (q/k/v, gate/up; M = 1..3 members, member m owning y's columns
[off_m, off_m + out_m)):

    shrunk[m, t, :r] = x[t] @ lora_a[m][s, :r].T                        # lora_shrink, fp32
    y[t, off_m : off_m + out_m] += shrunk[m, t, :r] @ lora_b[m][s, :r]  # lora_expand, in y's dtype

The same op as `add_lora_delta` in ops/lora.py (its oracle), over all members at once: one shrink
launch reads x once for every member, one expand launch writes every member's column slice of y.
A slot's rank is an upper bound shared by the members (a member the adapter does not target holds
zeros there). Accumulation is fp32 for every dtype; for bf16/fp16 the shrunk row is rounded to the
stacks' dtype before the expand, as the reference op rounds it (and as tensor cores take it).

Two variants of each kernel:
  * SGMV (segments): tokens are ordered by slot, so each adapter is a contiguous segment; a program
    takes BLOCK_M rows of one segment and multiplies them by the segment's A or B tile with tl.dot,
    so each tile is read once per BLOCK_M tokens. Grid: segments x row blocks (x column blocks).
  * BGMV (tokens): a program takes one token and does a matrix-vector product (broadcast multiply
    and tl.sum), so no tile is mostly padding when every adapter run is a token or two (decode).
    Grid: tokens (x column blocks).
Choice (`pick_variant`): SGMV when some adapter segment holds at least SGMV_MIN_SEGMENT tokens (a
prefill, or a decode step where many sequences share an adapter: one 16-row tile is then full),
BGMV otherwise. The block sizes are first guesses, not tuned on a GPU.

Both skip a rank-0 token or segment (the null slot, a slot without an adapter) at once. The expand
loops over a slot's rank rows in chunks of RANK_CHUNK up to that rank only; the shrink's tile is the
step's largest rank padded to a power of two (>= 16), so a low-rank slot multiplies some zeros. Every
load of a stack or of the shrunk buffer is masked to the slot's rank: rows at or beyond it are never
read (they may hold anything, NaN included). It must not import the rest of loraplex (plain tensors in,
y updated in place), nor synchronize the device (every grid is sized from host ints).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_MEMBERS = 3  # q/k/v
VARIANTS = ("auto", "sgmv", "bgmv")
SGMV_MIN_SEGMENT = 16  # the longest adapter segment from which SGMV is picked (one full BLOCK_M tile)
RANK_CHUNK = 16  # rank rows per expand step (tl.dot's smallest K)
EXPAND_BLOCK_N = 64  # output columns per expand program
# Register budgets, in fp32 accumulator elements per shrink program over all members. With them and
# SGMV_WARPS, no kernel spills on sm_90 (ptxas via triton 3.9; fp32, bf16 and fp16, 1 or 3 members,
# rank 16 to 128, segments of 16 to 64 rows).
SGMV_TILE_BUDGET = 8192
BGMV_TILE_BUDGET = 4096
SGMV_WARPS = 8


@dataclass
class LoraKernelBatch:
    """How the tokens of one step map to slots, as the kernels read it; shared by every wrapped layer."""

    token_slots: torch.Tensor  # [T] int32 slot of each token (the null slot for base-only tokens)
    slot_ranks: torch.Tensor  # [S + 1] int32 rank of each slot this step (0: nothing to add)
    seg_starts: torch.Tensor  # [G + 1] int32: segment g is tokens seg_starts[g] .. seg_starts[g + 1] - 1
    seg_slots: torch.Tensor  # [G] int32 the slot of each segment (every run of equal slots; null runs have rank 0)
    max_seg_len: int  # the longest segment of rank > 0 (the SGMV grid's rows)
    max_rank: int  # the step's largest rank (0: nothing to do at all)
    num_tokens: int
    variant: str = "auto"  # one of VARIANTS: auto picks per launch (`pick_variant`), the others force one


def build_kernel_batch(
    token_slots: list[int],
    slot_ranks: dict[int, int],
    num_slots: int,
    device: torch.device,
    variant: str = "auto",
    upload: Callable[[Sequence[Sequence[int]]], list[torch.Tensor]] | None = None,
) -> LoraKernelBatch:
    """The step's kernel metadata, from the same inputs as `build_lora_batch`.

    Args:
        token_slots: each token's slot, in step order (an adapter's tokens form contiguous runs).
        slot_ranks: the rank of each adapter slot used this step (the null slot absent).
        num_slots: S + 1, the stacks' slot count (the null slot included).
        device: where the forward runs.
        variant: one of VARIANTS, for every launch of the step.
        upload: turns the four int lists into int32 device tensors (the engine's one-copy upload);
            by default one `torch.tensor` each.

    >>> batch = build_kernel_batch([2, 2, 3, 0], {2: 8, 0: 4}, 4, torch.device("cpu"))
    >>> batch.seg_starts.tolist(), batch.seg_slots.tolist(), batch.max_seg_len, batch.max_rank
    ([0, 2, 3, 4], [2, 3, 0], 2, 8)
    """
    if any(not 0 <= slot < num_slots for slot in token_slots) or any(not 0 <= slot < num_slots for slot in slot_ranks):
        raise ValueError(f"token and rank slots must lie in [0, {num_slots})")
    ranks = [0] * num_slots
    for slot, rank in slot_ranks.items():
        ranks[slot] = rank
    starts = [index for index in range(len(token_slots)) if index == 0 or token_slots[index] != token_slots[index - 1]]
    bounds = [*starts, len(token_slots)]
    ranked_lengths = [end - start for start, end in zip(bounds, bounds[1:]) if ranks[token_slots[start]] > 0]
    lists = (token_slots, ranks, bounds, [token_slots[start] for start in starts])
    if upload is None:
        tensors = [torch.tensor(values, dtype=torch.int32, device=device) for values in lists]
    else:
        tensors = upload(lists)
    return LoraKernelBatch(
        *tensors,
        max_seg_len=max(ranked_lengths, default=0),
        max_rank=max((ranks[token_slots[start]] for start in starts), default=0),
        num_tokens=len(token_slots),
        variant=_variant_name(variant),
    )


def pick_variant(batch: LoraKernelBatch) -> str:
    """SGMV when one adapter segment fills a tile of SGMV_MIN_SEGMENT rows, else BGMV (see the module docstring)."""
    return "sgmv" if batch.max_seg_len >= SGMV_MIN_SEGMENT else "bgmv"


@triton.jit
def _segment_tile(seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr, BLOCK_M: tl.constexpr):
    """This SGMV program's rows: (rows [BLOCK_M] token indices, their mask, the slot, its rank: 0 when nothing to do)."""
    segment = tl.program_id(0)
    first = tl.load(seg_starts_ptr + segment) + tl.program_id(1) * BLOCK_M
    end = tl.load(seg_starts_ptr + segment + 1)
    slot = tl.load(seg_slots_ptr + segment)
    rank = tl.load(slot_ranks_ptr + slot)
    rows = first + tl.arange(0, BLOCK_M)
    return rows, rows < end, slot, tl.where(first < end, rank, 0)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr, seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr,
    in_features, stride_x, stride_a_slot, stride_a_rank, stride_out_member, stride_out_token,
    NUM_MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    rows, row_mask, slot, rank = _segment_tile(seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr, BLOCK_M)
    if rank == 0:
        return
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank
    columns = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # [BLOCK_M, 1]
    a_rows = slot.to(tl.int64) * stride_a_slot + ranks[None, :] * stride_a_rank  # [1, BLOCK_R]
    acc0 = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    acc1 = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + columns
        k_mask = k < in_features
        x = tl.load(x_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if UPCAST_DOT:
            x = x.to(tl.float32)
        a_offsets = a_rows + k[:, None]  # [BLOCK_K, BLOCK_R]
        a_mask = k_mask[:, None] & rank_mask[None, :]
        acc0 = tl.dot(x, tl.load(a0_ptr + a_offsets, mask=a_mask, other=0.0).to(x.dtype), acc0, input_precision="ieee")
        if NUM_MEMBERS > 1:
            acc1 = tl.dot(x, tl.load(a1_ptr + a_offsets, mask=a_mask, other=0.0).to(x.dtype), acc1, input_precision="ieee")
        if NUM_MEMBERS > 2:
            acc2 = tl.dot(x, tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0).to(x.dtype), acc2, input_precision="ieee")
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out_token + ranks[None, :]  # [BLOCK_M, BLOCK_R]
    out_mask = row_mask[:, None] & rank_mask[None, :]
    tl.store(out_rows, acc0, mask=out_mask)
    if NUM_MEMBERS > 1:
        tl.store(out_rows + stride_out_member, acc1, mask=out_mask)
    if NUM_MEMBERS > 2:
        tl.store(out_rows + 2 * stride_out_member, acc2, mask=out_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr, token_slots_ptr, slot_ranks_ptr,
    in_features, stride_x, stride_a_slot, stride_a_rank, stride_out_member, stride_out_token,
    NUM_MEMBERS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(token_slots_ptr + token)
    rank = tl.load(slot_ranks_ptr + slot)
    if rank == 0:
        return
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank
    columns = tl.arange(0, BLOCK_K)
    x_row = x_ptr + token.to(tl.int64) * stride_x
    a_rows = slot.to(tl.int64) * stride_a_slot + ranks[:, None] * stride_a_rank  # [BLOCK_R, 1]
    acc0 = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)
    acc1 = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + columns
        k_mask = k < in_features
        x = tl.load(x_row + k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        a_offsets = a_rows + k[None, :]  # [BLOCK_R, BLOCK_K]
        a_mask = rank_mask[:, None] & k_mask[None, :]
        acc0 += tl.load(a0_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32) * x[None, :]
        if NUM_MEMBERS > 1:
            acc1 += tl.load(a1_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32) * x[None, :]
        if NUM_MEMBERS > 2:
            acc2 += tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32) * x[None, :]
    out_row = out_ptr + token.to(tl.int64) * stride_out_token + ranks  # [BLOCK_R]
    tl.store(out_row, tl.sum(acc0, axis=1), mask=rank_mask)
    if NUM_MEMBERS > 1:
        tl.store(out_row + stride_out_member, tl.sum(acc1, axis=1), mask=rank_mask)
    if NUM_MEMBERS > 2:
        tl.store(out_row + 2 * stride_out_member, tl.sum(acc2, axis=1), mask=rank_mask)


@triton.jit
def _sgmv_expand_kernel(
    shrunk_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr,
    out0, out1, out2, stack_rank, stride_s_member, stride_s_token, stride_y,
    NUM_MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    rows, row_mask, slot, rank = _segment_tile(seg_starts_ptr, seg_slots_ptr, slot_ranks_ptr, BLOCK_M)
    if rank == 0:
        return
    first_column = tl.program_id(2) * BLOCK_N
    columns = first_column + tl.arange(0, BLOCK_N)  # [BLOCK_N] within each member's slice
    s_rows = shrunk_ptr + rows.to(tl.int64)[:, None] * stride_s_token  # [BLOCK_M, 1]
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_y  # [BLOCK_M, 1]
    slot_row = slot.to(tl.int64) * stack_rank  # the slot's first row in each [(S + 1) * R, out_m] stack
    chunk = tl.arange(0, BLOCK_R)  # rank rows per step
    for member in tl.static_range(NUM_MEMBERS):
        if member == 0:
            b_ptr, width, offset = b0_ptr + slot_row * out0, out0, 0
        elif member == 1:
            b_ptr, width, offset = b1_ptr + slot_row * out1, out1, out0
        else:
            b_ptr, width, offset = b2_ptr + slot_row * out2, out2, out0 + out1
        if first_column < width:
            column_mask = columns < width
            s_member = s_rows + member * stride_s_member  # [BLOCK_M, 1]
            b_columns = b_ptr + columns[None, :]  # [1, BLOCK_N]
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                ranks = r0 + chunk
                rank_mask = ranks < rank
                s = tl.load(s_member + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
                b_mask = rank_mask[:, None] & column_mask[None, :]
                b = tl.load(b_columns + ranks[:, None] * width, mask=b_mask, other=0.0)  # [BLOCK_R, BLOCK_N]
                s = s.to(b.dtype)  # rounded to the stacks' dtype, as the reference op rounds it
                if UPCAST_DOT:
                    s, b = s.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(s, b, acc, input_precision="ieee")
            y_ptrs = y_rows + offset + columns[None, :]  # [BLOCK_M, BLOCK_N]
            y_mask = row_mask[:, None] & column_mask[None, :]
            y = tl.load(y_ptrs, mask=y_mask)
            tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=y_mask)


@triton.jit
def _bgmv_expand_kernel(
    shrunk_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, token_slots_ptr, slot_ranks_ptr,
    out0, out1, out2, stack_rank, stride_s_member, stride_s_token, stride_y,
    NUM_MEMBERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(token_slots_ptr + token)
    rank = tl.load(slot_ranks_ptr + slot)
    if rank == 0:
        return
    first_column = tl.program_id(1) * BLOCK_N
    columns = first_column + tl.arange(0, BLOCK_N)  # [BLOCK_N] within each member's slice
    s_row = shrunk_ptr + token.to(tl.int64) * stride_s_token
    y_row = y_ptr + token.to(tl.int64) * stride_y
    slot_row = slot.to(tl.int64) * stack_rank  # the slot's first row in each [(S + 1) * R, out_m] stack
    chunk = tl.arange(0, BLOCK_R)  # rank rows per step
    for member in tl.static_range(NUM_MEMBERS):
        if member == 0:
            b_ptr, width, offset = b0_ptr + slot_row * out0, out0, 0
        elif member == 1:
            b_ptr, width, offset = b1_ptr + slot_row * out1, out1, out0
        else:
            b_ptr, width, offset = b2_ptr + slot_row * out2, out2, out0 + out1
        if first_column < width:
            column_mask = columns < width
            s_member = s_row + member * stride_s_member
            b_columns = b_ptr + columns[None, :]  # [1, BLOCK_N]
            acc = tl.full((BLOCK_R, BLOCK_N), 0.0, tl.float32)  # summed over ranks once, after the loop
            for r0 in range(0, rank, BLOCK_R):
                ranks = r0 + chunk
                rank_mask = ranks < rank
                s = tl.load(s_member + ranks, mask=rank_mask, other=0.0)  # [BLOCK_R]
                b_mask = rank_mask[:, None] & column_mask[None, :]
                b = tl.load(b_columns + ranks[:, None] * width, mask=b_mask, other=0.0)  # [BLOCK_R, BLOCK_N]
                acc += s.to(b.dtype).to(tl.float32)[:, None] * b.to(tl.float32)
            y_ptrs = y_row + offset + columns  # [BLOCK_N]
            y = tl.load(y_ptrs, mask=column_mask)
            tl.store(y_ptrs, (y.to(tl.float32) + tl.sum(acc, axis=0)).to(y.dtype), mask=column_mask)


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot gets fp32 copies of its bf16 operands: only under Triton's interpreter, which
    multiplies bf16 tiles as their raw uint16 bits (triton-lang/triton#11584). The copies are exact,
    so the result is the bf16 product accumulated in fp32, as the tensor cores compute it."""
    return dtype == torch.bfloat16 and not isinstance(_sgmv_shrink_kernel, triton.runtime.JITFunction)


def _members(stacks: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """The member stacks, checked: 1..3 contiguous [S + 1, R, width] tensors of one dtype, device, S and R."""
    stacks = list(stacks)
    first = stacks[0] if stacks else None
    if not 1 <= len(stacks) <= MAX_MEMBERS or any(
        stack.dim() != 3 or not stack.is_contiguous() or stack.dtype != first.dtype or stack.device != first.device
        or stack.shape[:2] != first.shape[:2]
        for stack in stacks
    ):  # fmt: skip
        raise ValueError(f"{name}: expected 1 to {MAX_MEMBERS} contiguous [S + 1, R, width] stacks of one dtype, S and R")
    return stacks


def _padded(stacks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Three pointer arguments: the members, then the first repeated (never read past NUM_MEMBERS)."""
    return stacks + [stacks[0]] * (MAX_MEMBERS - len(stacks))


def _variant_name(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LoRA kernel variant {variant!r}; expected one of {VARIANTS}")
    return variant


def _variant(batch: LoraKernelBatch, variant: str | None) -> str:
    """The variant of one launch: `variant`, else the batch's; auto resolved by `pick_variant`."""
    variant = _variant_name(variant or batch.variant)
    return pick_variant(batch) if variant == "auto" else variant


def _segment_rows(max_seg_len: int) -> int:
    """SGMV's BLOCK_M before any register cap: the longest segment rounded up to a power of two, 16 to 64."""
    return min(64, triton.next_power_of_2(max(16, max_seg_len)))


def shrink_blocks(variant: str, max_seg_len: int, max_rank: int, members: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_R) of a shrink launch (BLOCK_M: 1 for BGMV), all powers of two.

    BLOCK_R pads the step's largest rank to at least 16 (tl.dot's smallest N). SGMV keeps its
    members' [BLOCK_M, BLOCK_R] fp32 accumulators within SGMV_TILE_BUDGET, over 32 input columns a
    step (16 from rank 64); BGMV spends BGMV_TILE_BUDGET on [BLOCK_R, BLOCK_K] tiles (16 to 128 columns).

    >>> shrink_blocks("sgmv", 300, 64, 3), shrink_blocks("bgmv", 1, 16, 3)
    ((32, 16, 64), (1, 64, 16))
    """
    block_r = max(16, triton.next_power_of_2(max_rank))
    if variant == "sgmv":
        block_m = _segment_rows(max_seg_len)
        while block_m > 16 and block_m * block_r * members > SGMV_TILE_BUDGET:
            block_m //= 2
        return block_m, 32 if block_r <= 32 else 16, block_r
    budget_k = BGMV_TILE_BUDGET // (block_r * members)
    return 1, max(16, min(128, 1 << (budget_k.bit_length() - 1))), block_r


def _check_shrunk(shrunk: torch.Tensor, stacks: list[torch.Tensor], batch: LoraKernelBatch) -> None:
    """The shrunk buffer fits the members and the step, and no slot's rank runs past the stacks' R."""
    expected = f"float32 [{len(stacks)}, {batch.num_tokens}, >= {batch.max_rank}] with contiguous rows"
    if shrunk.dtype != torch.float32 or shrunk.shape[:2] != (len(stacks), batch.num_tokens) or shrunk.shape[2] < batch.max_rank:
        raise ValueError(f"shrunk: expected {expected}, got {shrunk.dtype} {list(shrunk.shape)}")
    if shrunk.stride(2) != 1:
        raise ValueError(f"shrunk: expected {expected}, got strides {shrunk.stride()}")
    if batch.max_rank > stacks[0].shape[1]:
        raise ValueError(f"rank {batch.max_rank} exceeds the stacks' {stacks[0].shape[1]} rows per slot")


def lora_shrink(
    x: torch.Tensor, lora_a: Sequence[torch.Tensor], batch: LoraKernelBatch, out: torch.Tensor, *, variant: str | None = None
) -> None:
    """Write `out[m, t, :r] = x[t] @ lora_a[m][s, :r].T` for every member m and token t of rank r > 0 (one launch).

    Args:
        x: [T, in] the group's input (stride(1) == 1), of the stacks' dtype.
        lora_a: M = 1..3 contiguous [S + 1, R, in] A stacks of the group's members.
        batch: the step's kernel metadata.
        out: [M, T, >= max_rank] float32; columns at or beyond each token's rank are left as they were.
        variant: auto, sgmv or bgmv (auto: `pick_variant`); by default the batch's.
    """
    stacks = _members(lora_a, "lora_a")
    in_features = stacks[0].shape[2]
    if x.shape != (batch.num_tokens, in_features) or x.stride(1) != 1 or x.dtype != stacks[0].dtype:
        raise ValueError(f"x: expected [{batch.num_tokens}, {in_features}] {stacks[0].dtype} rows, got {x.dtype} {list(x.shape)}")
    _check_shrunk(out, stacks, batch)
    if batch.max_rank == 0:
        return
    variant = _variant(batch, variant)
    block_m, block_k, block_r = shrink_blocks(variant, batch.max_seg_len, batch.max_rank, len(stacks))
    a_strides = (stacks[0].stride(0), stacks[0].stride(1))
    common = (in_features, x.stride(0), *a_strides, out.stride(0), out.stride(1))
    if variant == "sgmv":
        grid = (batch.seg_slots.numel(), triton.cdiv(batch.max_seg_len, block_m))
        _sgmv_shrink_kernel[grid](
            x, *_padded(stacks), out, batch.seg_starts, batch.seg_slots, batch.slot_ranks, *common,
            NUM_MEMBERS=len(stacks), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, UPCAST_DOT=_upcast_dot(x.dtype),
            num_warps=SGMV_WARPS,
        )  # fmt: skip
        return
    _bgmv_shrink_kernel[(batch.num_tokens,)](
        x, *_padded(stacks), out, batch.token_slots, batch.slot_ranks, *common,
        NUM_MEMBERS=len(stacks), BLOCK_K=block_k, BLOCK_R=block_r,
    )  # fmt: skip


def lora_expand(
    shrunk: torch.Tensor, lora_b: Sequence[torch.Tensor], batch: LoraKernelBatch, y: torch.Tensor, *, variant: str | None = None
) -> None:
    """Add `shrunk[m, t, :r] @ lora_b[m][s, :r]` into member m's columns of `y`, in y's dtype (one launch).

    Args:
        shrunk: [M, T, >= max_rank] float32, as `lora_shrink` wrote it (only columns below each token's rank are read).
        lora_b: M = 1..3 contiguous [S + 1, R, out_m] transposed, pre-scaled B stacks (out widths may differ).
        batch: the step's kernel metadata.
        y: [T, sum(out_m)] the group's output, member m's columns from off_m = out_0 + .. + out_{m-1};
            any row stride, stride(1) == 1 (a column slice of a wider buffer is fine).
        variant: auto, sgmv or bgmv (auto: `pick_variant`); by default the batch's.
    """
    stacks = _members(lora_b, "lora_b")
    widths = [stack.shape[2] for stack in stacks]
    if y.shape != (batch.num_tokens, sum(widths)) or y.stride(1) != 1 or y.dtype != stacks[0].dtype:
        raise ValueError(f"y: expected [{batch.num_tokens}, {sum(widths)}] {stacks[0].dtype} rows, got {y.dtype} {list(y.shape)}")
    _check_shrunk(shrunk, stacks, batch)
    if batch.max_rank == 0:
        return
    column_blocks = triton.cdiv(max(widths), EXPAND_BLOCK_N)
    common = (*widths, *[0] * (MAX_MEMBERS - len(widths)), stacks[0].shape[1], shrunk.stride(0), shrunk.stride(1), y.stride(0))
    if _variant(batch, variant) == "sgmv":
        block_m = _segment_rows(batch.max_seg_len)
        grid = (batch.seg_slots.numel(), triton.cdiv(batch.max_seg_len, block_m), column_blocks)
        _sgmv_expand_kernel[grid](
            shrunk, *_padded(stacks), y, batch.seg_starts, batch.seg_slots, batch.slot_ranks, *common,
            NUM_MEMBERS=len(stacks), BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=RANK_CHUNK, UPCAST_DOT=_upcast_dot(y.dtype),
            num_warps=SGMV_WARPS,
        )  # fmt: skip
        return
    _bgmv_expand_kernel[(batch.num_tokens, column_blocks)](
        shrunk, *_padded(stacks), y, batch.token_slots, batch.slot_ranks, *common,
        NUM_MEMBERS=len(stacks), BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=RANK_CHUNK,
    )  # fmt: skip


def add_lora_delta_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    batch: LoraKernelBatch,
    *,
    variant: str | None = None,
) -> None:
    """Add every token's LoRA delta of every member to `y`, in place: `lora_shrink`, then `lora_expand` (two launches).

    Args:
        y: [T, sum(out_m)] the group's base output (stride(1) == 1).
        x: [T, in] the group's input.
        lora_a: the members' [S + 1, R, in] A stacks.
        lora_b: the members' [S + 1, R, out_m] B stacks, in the same order.
        batch: the step's kernel metadata; no launch at all when its max_rank is 0.
        variant: auto, sgmv or bgmv (auto: `pick_variant`); by default the batch's.
    """
    if batch.max_rank == 0:
        return
    if len(lora_a) != len(lora_b):
        raise ValueError(f"{len(lora_a)} A stacks for {len(lora_b)} B stacks")
    shrunk = torch.empty(len(lora_a), batch.num_tokens, batch.max_rank, dtype=torch.float32, device=x.device)  # [M, T, r]
    lora_shrink(x, lora_a, batch, shrunk, variant=variant)
    lora_expand(shrunk, lora_b, batch, y, variant=variant)

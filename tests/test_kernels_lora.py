"""The Triton LoRA kernels against the reference op, over layouts, rank mixes, widths, members, dtypes and variants.

On CUDA the kernels run compiled; without it Triton's interpreter runs them on CPU tensors
(TRITON_INTERPRET=1, which conftest.py sets before anything imports triton). The oracle
is `add_lora_delta` (gather strategy) run per member in float64 on the same inputs.
"""

import pytest
import torch

pytest.importorskip("triton")

from loraplex.engine.ops.lora import add_lora_delta, build_lora_batch  # noqa: E402
from loraplex.engine.ops.lora_triton import (  # noqa: E402
    SGMV_MIN_SEGMENT,
    add_lora_delta_triton,
    build_kernel_batch,
    lora_expand,
    lora_shrink,
    pick_variant,
)

pytestmark = pytest.mark.kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STACK_RANK = 32  # max_lora_rank: every stack has this many rows per slot
VARIANTS = ("sgmv", "bgmv")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Worst error against the float64 oracle over every case of the table, y and deltas of unit scale
# (interpreter on CPU, seeds 0 and 1): fp32 1.2e-6 absolute; fp16 4.6e-4 and bf16 8.5e-3 as max
# |error| / max |expected|: one rounding of the result and of the shrunk row to the stacks' dtype.
# bf16 is the loosest because the interpreter's fp32 -> bf16 casts truncate (half of the values
# come out one unit lower than torch's round-to-nearest); compiled casts round to nearest.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}

# Members of a projection group: the shared input width, then each member's output width.
GROUPS = {
    "q": (80, (80,)),
    "qkv_gqa": (48, (64, 32, 32)),
    "gate_up": (96, (96, 96)),
    "qkv_odd": (80, (80, 48, 48)),
}
MIXED_RANKS = (1, 24, 8, 4, 16, 2, 12, 5)  # per slot, cycled: rank 1, and one over a 16-row chunk


def layout(name: str, num_slots: int) -> list[int]:
    """Each token's slot in step order, for `num_slots` adapter slots (slot `num_slots` is the null slot)."""
    null = num_slots
    if name == "decode":  # one token per sequence, one or two sequences per adapter
        return [slot for slot in range(num_slots) for _ in range(1 + slot % 2)]
    if name == "prefill":  # one long segment, on the highest adapter slot
        return [num_slots - 1] * 16
    if name == "mixed":  # a prefill, then decode tokens of the other adapters, then base-only tokens
        return [0] * 16 + list(range(1, num_slots)) + [null] * 2
    # null_interleaved: base-only tokens between and around the adapters' runs
    return [token for slot in range(num_slots) for token in [null] * (1 + slot % 2) + [slot] * (1 + slot % 3)] + [null]


def slot_ranks_for(ranks: str, num_slots: int) -> dict[int, int]:
    if ranks == "mixed":
        return {slot: MIXED_RANKS[slot % len(MIXED_RANKS)] for slot in range(num_slots)}
    return dict.fromkeys(range(num_slots), int(ranks))


def make_stack(num_slots: int, width: int, slot_ranks: dict[int, int], fan_in: int | None, dtype: torch.dtype) -> torch.Tensor:
    """[S + 1, STACK_RANK, width]: each slot's rows :rank random, the rest and the null slot zero (as `write_slot` leaves them).

    Rows are scaled by 1 / sqrt(fan_in) (A) or 1 / sqrt(rank) (B, fan_in None), so shrunk rows and deltas are of unit scale.
    """
    stack = torch.zeros(num_slots + 1, STACK_RANK, width, dtype=torch.float64)
    for slot, rank in slot_ranks.items():
        stack[slot, :rank] = torch.randn(rank, width, dtype=torch.float64) / (fan_in or rank) ** 0.5
    return stack.to(device=DEVICE, dtype=dtype)


def make_problem(group: str, num_slots: int, slot_ranks: dict[int, int], num_tokens: int, dtype: torch.dtype, seed: int = 0):
    """x [T, in], y [T, sum(out)] and the members' A and B stacks; in a 3-member group, slot 1's adapter leaves k out."""
    torch.manual_seed(seed)
    in_features, outs = GROUPS[group]
    lora_a = [make_stack(num_slots, in_features, slot_ranks, in_features, dtype) for _ in outs]
    lora_b = [make_stack(num_slots, out, slot_ranks, None, dtype) for out in outs]
    if len(outs) == 3 and num_slots > 1:  # an adapter of q and v only: k's slot is zeros up to the shared rank
        lora_a[1][1].zero_()
        lora_b[1][1].zero_()
    x = torch.randn(num_tokens, in_features, dtype=torch.float64).to(DEVICE, dtype)
    y = torch.randn(num_tokens, sum(outs), dtype=torch.float64).to(DEVICE, dtype)
    return x, y, lora_a, lora_b


def reference(y, x, lora_a, lora_b, token_slots: list[int], slot_ranks: dict[int, int]) -> torch.Tensor:
    """y plus every member's delta by `add_lora_delta` (gather strategy), in float64."""
    expected = y.double()
    batch = build_lora_batch(token_slots, slot_ranks, STACK_RANK, DEVICE, strategy="gather")
    if batch is None:
        return expected
    offset = 0
    for a, b in zip(lora_a, lora_b):
        add_lora_delta(expected[:, offset : offset + b.shape[2]], x.double(), a.double(), b.double(), batch)
        offset += b.shape[2]
    return expected


def error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error for fp32; for 16-bit dtypes, relative to the largest expected value."""
    worst = (got.double() - expected).abs().max().item()
    return worst if got.dtype == torch.float32 else worst / expected.abs().max().item()


# layout, adapter slots, ranks, group
CASES = {
    "decode-1slot-r4-q": ("decode", 1, "4", "q"),
    "decode-8slots-r8-qkv_gqa": ("decode", 8, "8", "qkv_gqa"),
    "decode-3slots-mixed-gate_up": ("decode", 3, "mixed", "gate_up"),
    "prefill-1slot-r16-gate_up": ("prefill", 1, "16", "gate_up"),
    "prefill-3slots-mixed-qkv_odd": ("prefill", 3, "mixed", "qkv_odd"),
    "mixed-8slots-mixed-qkv_gqa": ("mixed", 8, "mixed", "qkv_gqa"),
    "mixed-3slots-r8-gate_up": ("mixed", 3, "8", "gate_up"),
    "null-3slots-r4-qkv_odd": ("null_interleaved", 3, "4", "qkv_odd"),
    "null-8slots-mixed-q": ("null_interleaved", 8, "mixed", "q"),
}


def case_problem(case, dtype: torch.dtype, seed: int = 0):
    """The problem of one table row: token slots, slot ranks, kernel batch, then x, y and the stacks."""
    layout_name, num_slots, ranks, group = case
    token_slots = layout(layout_name, num_slots)
    slot_ranks = slot_ranks_for(ranks, num_slots)
    batch = build_kernel_batch(token_slots, slot_ranks, num_slots + 1, DEVICE)
    return token_slots, slot_ranks, batch, *make_problem(group, num_slots, slot_ranks, len(token_slots), dtype, seed)


# fp16 takes bf16's paths but for the rounding (and the interpreter's bf16 work-arounds): one case per layout.
FP16_CASES = ("decode-8slots-r8-qkv_gqa", "prefill-3slots-mixed-qkv_odd", "mixed-3slots-r8-gate_up", "null-8slots-mixed-q")
TABLE = [
    pytest.param(case, dtype, id=f"{name}-{dtype_name}")
    for name, case in CASES.items()
    for dtype_name, dtype in DTYPES.items()
    if dtype_name != "fp16" or name in FP16_CASES
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, dtype", TABLE)
def test_delta_matches_reference(case, dtype, variant):
    token_slots, slot_ranks, batch, x, y, lora_a, lora_b = case_problem(case, dtype)
    expected = reference(y, x, lora_a, lora_b, token_slots, slot_ranks)
    add_lora_delta_triton(y, x, lora_a, lora_b, batch, variant=variant)
    assert error(y, expected) <= TOLERANCES[dtype]


@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_matches_einsum(variant):
    token_slots, slot_ranks, batch, x, y, lora_a, lora_b = case_problem(CASES["mixed-8slots-mixed-qkv_gqa"], torch.float32)
    slots = torch.tensor(token_slots, device=DEVICE)
    deltas = [torch.einsum("ti,tri,tro->to", x, a[slots], b[slots]) for a, b in zip(lora_a, lora_b)]  # [T, out_m] each
    expected = y + torch.cat(deltas, dim=1)
    add_lora_delta_triton(y, x, lora_a, lora_b, batch, variant=variant)
    assert (y - expected).abs().max().item() <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("variant", VARIANTS)
def test_shrink_writes_each_tokens_rank_columns_only(variant):
    token_slots, slot_ranks, batch, x, _, lora_a, _ = case_problem(CASES["null-8slots-mixed-q"], torch.float32)
    out = torch.full((1, len(token_slots), batch.max_rank), -7.0, device=DEVICE)
    lora_shrink(x, lora_a, batch, out, variant=variant)
    for token, slot in enumerate(token_slots):
        rank = slot_ranks.get(slot, 0)
        assert torch.allclose(out[0, token, :rank], x[token] @ lora_a[0][slot, :rank].T, atol=1e-5)
        assert torch.equal(out[0, token, rank:], torch.full_like(out[0, token, rank:], -7.0))


def poison(stack: torch.Tensor, slot_ranks: dict[int, int]) -> torch.Tensor:
    """A copy of `stack` with NaN in every row no token may read: beyond each slot's rank, and all of the other slots."""
    poisoned = torch.full_like(stack, float("nan"))
    for slot, rank in slot_ranks.items():
        poisoned[slot, :rank] = stack[slot, :rank]
    return poisoned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_in_rows_beyond_rank_does_not_leak(variant, dtype):
    token_slots, slot_ranks, batch, x, y, lora_a, lora_b = case_problem(CASES["mixed-8slots-mixed-qkv_gqa"], dtype)
    expected = reference(y, x, lora_a, lora_b, token_slots, slot_ranks)
    shrunk = torch.full((len(lora_a), len(token_slots), batch.max_rank), float("nan"), device=DEVICE)  # [M, T, r]
    lora_shrink(x, [poison(a, slot_ranks) for a in lora_a], batch, shrunk, variant=variant)
    lora_expand(shrunk, [poison(b, slot_ranks) for b in lora_b], batch, y, variant=variant)
    assert not y.isnan().any()
    assert error(y, expected) <= TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_base_only_and_rank0_tokens_leave_y_bitwise_unchanged(variant, dtype):
    # Slot 2 has no adapter this step (absent from slot_ranks: rank 0), slot 3 is the null slot; both are all NaN.
    token_slots = [3, 0, 0, 3, 2, 2, 1, 3]
    slot_ranks = {0: 8, 1: 4}
    x, y, lora_a, lora_b = make_problem("qkv_gqa", 3, slot_ranks, len(token_slots), dtype)
    expected = reference(y, x, lora_a, lora_b, token_slots, slot_ranks)
    before = y.clone()
    batch = build_kernel_batch(token_slots, slot_ranks, 4, DEVICE)
    add_lora_delta_triton(y, x, [poison(a, slot_ranks) for a in lora_a], [poison(b, slot_ranks) for b in lora_b], batch, variant=variant)
    untouched = [token for token, slot in enumerate(token_slots) if slot not in slot_ranks]
    assert torch.equal(y[untouched], before[untouched])
    assert error(y, expected) <= TOLERANCES[dtype]


def test_step_without_adapters_launches_nothing():
    token_slots = [3, 3, 2]  # the null slot and a slot without an adapter
    x, y, lora_a, lora_b = make_problem("qkv_odd", 3, {}, len(token_slots), torch.float32)
    batch = build_kernel_batch(token_slots, {}, 4, DEVICE)
    before = y.clone()
    add_lora_delta_triton(y, x, [a.fill_(float("nan")) for a in lora_a], [b.fill_(float("nan")) for b in lora_b], batch)
    assert batch.max_rank == 0 and torch.equal(y, before)


@pytest.mark.parametrize("group", ["q", "qkv_odd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_y_may_be_a_column_slice_of_a_wider_buffer(variant, group):
    token_slots, slot_ranks, batch, x, y, lora_a, lora_b = case_problem(("mixed", 3, "mixed", group), torch.float32)
    expected = reference(y, x, lora_a, lora_b, token_slots, slot_ranks)
    buffer = torch.randn(len(token_slots), y.shape[1] + 24, device=DEVICE)  # [T, 8 + sum(out) + 16]
    view = buffer[:, 8 : 8 + y.shape[1]]
    view.copy_(y)
    before = buffer.clone()
    add_lora_delta_triton(view, x, lora_a, lora_b, batch, variant=variant)
    assert error(view, expected) <= TOLERANCES[torch.float32]
    assert torch.equal(buffer[:, :8], before[:, :8]) and torch.equal(buffer[:, 8 + y.shape[1] :], before[:, 8 + y.shape[1] :])


def test_long_segment_spans_several_row_blocks():
    token_slots = [1] * 70 + [0] * 3 + [2]  # SGMV: 70 rows are two 64-row blocks; rank 24 is two rank chunks
    slot_ranks = {0: 4, 1: 24}
    x, y, lora_a, lora_b = make_problem("qkv_gqa", 2, slot_ranks, len(token_slots), torch.float32)
    expected = reference(y, x, lora_a, lora_b, token_slots, slot_ranks)
    add_lora_delta_triton(y, x, lora_a, lora_b, build_kernel_batch(token_slots, slot_ranks, 3, DEVICE), variant="sgmv")
    assert error(y, expected) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize(
    "token_slots, slot_ranks, seg_starts, seg_slots, max_seg_len, max_rank",
    [
        ([0, 0, 1, 2, 2, 2], {0: 4, 1: 8}, [0, 2, 3, 6], [0, 1, 2], 2, 8),  # slot 2 is the null slot
        ([2, 0, 0, 2, 1], {0: 16, 1: 1}, [0, 1, 3, 4, 5], [2, 0, 2, 1], 2, 16),
        ([2, 2, 2, 0], {0: 8}, [0, 3, 4], [2, 0], 1, 8),  # the long run is base-only: it does not size the grid
        ([2, 1], {}, [0, 1, 2], [2, 1], 0, 0),  # no adapter at all: nothing to launch
    ],
)
def test_build_kernel_batch(token_slots, slot_ranks, seg_starts, seg_slots, max_seg_len, max_rank):
    batch = build_kernel_batch(token_slots, slot_ranks, 3, DEVICE)
    assert batch.seg_starts.tolist() == seg_starts and batch.seg_slots.tolist() == seg_slots
    assert (batch.max_seg_len, batch.max_rank, batch.num_tokens) == (max_seg_len, max_rank, len(token_slots))
    assert batch.token_slots.dtype == batch.slot_ranks.dtype == batch.seg_starts.dtype == torch.int32


@pytest.mark.parametrize(
    "token_slots, variant",
    [
        (list(range(8)), "bgmv"),  # decode over many adapters
        ([0] * (SGMV_MIN_SEGMENT - 1) + [1], "bgmv"),
        ([0] * SGMV_MIN_SEGMENT + [1], "sgmv"),  # one segment fills a tile
        ([8] * 40 + [0], "bgmv"),  # a long base-only run does not count
    ],
)
def test_pick_variant(token_slots, variant):
    assert pick_variant(build_kernel_batch(token_slots, {slot: 8 for slot in range(8)}, 9, DEVICE)) == variant


def test_invalid_inputs_are_refused():
    token_slots, slot_ranks, batch, x, y, lora_a, lora_b = case_problem(CASES["decode-3slots-mixed-gate_up"], torch.float32)
    shrunk = torch.empty(2, len(token_slots), batch.max_rank, device=DEVICE)
    with pytest.raises(ValueError, match="stacks"):
        lora_shrink(x, lora_a * 2, batch, shrunk)  # four members
    with pytest.raises(ValueError, match="stacks"):
        lora_expand(shrunk, [lora_b[0], lora_b[1].half()], batch, y)  # mixed dtypes
    with pytest.raises(ValueError, match="stacks"):
        lora_shrink(x, [a.transpose(1, 2).contiguous().transpose(1, 2) for a in lora_a], batch, shrunk)  # not contiguous
    with pytest.raises(ValueError, match="shrunk"):
        lora_shrink(x, lora_a, batch, shrunk[:, :, :1])
    with pytest.raises(ValueError, match="variant"):
        add_lora_delta_triton(y, x, lora_a, lora_b, batch, variant="dense")

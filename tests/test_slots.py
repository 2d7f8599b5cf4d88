"""Device slots: allocation, LRU eviction, reference counts, and the per-step LoRA metadata."""

import pytest
import torch

from loraplex.engine.lora_layer import LoraContext, LoraLinear
from loraplex.engine.ops import lora as lora_ops
from loraplex.engine.ops.lora import add_lora_delta, build_lora_batch, find_segments
from loraplex.engine.slot_writer import make_image
from loraplex.engine.slots import SlotCache
from loraplex.lora.adapter import LoraAdapter, LoraWeights


def adapter(name: str) -> LoraAdapter:
    return LoraAdapter(name=name, rank=4, alpha=8, use_rslora=False, target_modules=[], modules={}, nbytes=0)


@pytest.fixture
def writes():
    return []


@pytest.fixture
def cache(writes):
    return SlotCache(2, lambda slot, a: writes.append((slot, None if a is None else a.name)))


def test_first_acquire_loads_into_a_free_slot(cache, writes):
    a = adapter("a")
    assert cache.acquire(a) == 0
    assert writes == [(0, "a")]
    assert (cache.stats.loads, cache.stats.lookups, cache.stats.hits) == (1, 1, 0)


def test_second_acquire_is_a_hit_without_a_copy(cache, writes):
    a = adapter("a")
    cache.acquire(a)
    assert cache.acquire(a) == 0
    assert len(writes) == 1
    assert cache.stats.hits == 1
    assert cache.refcount(a) == 2


def test_idle_adapters_are_evicted_least_recently_used_first(cache, writes):
    a, b, c = adapter("a"), adapter("b"), adapter("c")
    for x in (a, b):
        cache.acquire(x)
        cache.release(x)
    cache.acquire(a)  # a becomes most recently used
    cache.release(a)
    slot = cache.acquire(c)
    assert slot == cache.slot_of(c) == 1  # b's slot
    assert not cache.is_resident(b) and cache.is_resident(a)
    assert cache.stats.evictions == 1


def test_an_adapter_in_use_is_never_evicted(cache):
    a, b, c = adapter("a"), adapter("b"), adapter("c")
    cache.acquire(a)
    cache.acquire(b)
    cache.release(b)
    assert cache.acquire(c) == 1  # b was idle
    assert cache.acquire(adapter("d")) is None  # a and c are both in use
    assert cache.is_resident(a) and cache.is_resident(c)
    assert not cache.can_acquire(adapter("e"))


def test_release_makes_a_slot_evictable_again(cache):
    a, b = adapter("a"), adapter("b")
    cache.acquire(a)
    cache.acquire(b)
    assert not cache.can_acquire(adapter("c"))
    cache.release(a)
    assert cache.can_acquire(adapter("c"))


def test_release_more_than_acquired_is_an_error(cache):
    a = adapter("a")
    cache.acquire(a)
    cache.release(a)
    with pytest.raises(RuntimeError):
        cache.release(a)


def test_discard_waits_for_the_last_user(cache, writes):
    a = adapter("a")
    cache.acquire(a)
    assert cache.discard(a) is False
    cache.release(a)
    assert cache.discard(a) is True
    assert writes[-1] == (0, None)
    assert cache.used == 0


def test_versions_of_one_name_are_distinct(cache):
    old, new = adapter("a"), adapter("a")
    assert cache.acquire(old) != cache.acquire(new)


@pytest.mark.parametrize(
    "slots, ranks, expected",
    [
        ([], {}, []),
        ([9, 9, 9], {}, []),
        ([0, 0, 1], {0: 4, 1: 8}, [(0, 0, 2, 4), (1, 2, 3, 8)]),
        ([2, 2, 9, 0, 0, 0], {2: 8, 0: 4}, [(2, 0, 2, 8), (0, 3, 6, 4)]),
        ([1, 9, 1], {1: 16}, [(1, 0, 1, 16), (1, 2, 3, 16)]),
    ],
)
def test_find_segments(slots, ranks, expected):
    assert find_segments(slots, ranks) == expected


CPU = torch.device("cpu")


def test_no_lora_batch_when_no_token_uses_an_adapter():
    assert build_lora_batch([3, 3, 3], {}, 8, CPU) is None


@pytest.mark.parametrize(
    "slots, ranks, width, expected",
    [
        ([0, 1, 2, 3], {0: 16, 1: 16, 2: 16, 3: 16}, 256, "dense"),  # decode, few low slots
        (list(range(0, 64, 4)), {s: 16 for s in range(0, 64, 4)}, 256, "gather"),  # many slots, narrow layer
        (list(range(0, 64, 4)), {s: 16 for s in range(0, 64, 4)}, 5120, "segment"),  # many slots, wide layer
        ([0] * 64 + [1] * 64, {0: 4, 1: 8}, 256, "segment"),  # prefill: long segments
    ],
)
def test_auto_picks_the_cheapest_strategy_per_layer_width(slots, ranks, width, expected):
    batch = build_lora_batch(slots, ranks, 16, CPU)
    assert batch.strategy_for(width) == expected
    assert batch.rank == max(ranks.values()) and batch.slot_range == max(ranks) + 1


def test_a_forced_strategy_holds_for_every_layer_and_an_unknown_one_is_refused():
    batch = build_lora_batch([0, 30], {0: 4, 30: 4}, 16, CPU, "dense")
    assert {batch.strategy_for(width) for width in (16, 5120, 1 << 20)} == {"dense"}
    assert batch.dense_other().shape == (2, 31 * 16)
    with pytest.raises(ValueError, match="unknown LoRA strategy 'fast'"):
        build_lora_batch([0], {0: 4}, 16, CPU, "fast")


def test_strategy_costs_follow_what_each_strategy_touches():
    def cost(strategy, tokens=16, segments=12, slot_range=64, rank=16, width=5120):
        return lora_ops.strategy_cost(strategy, tokens, segments, slot_range, rank, 16, width)

    assert cost("gather", tokens=32) > cost("gather", tokens=16)  # copies per token
    assert cost("segment", segments=12) > cost("segment", segments=6)  # two matmuls per adapter run
    assert cost("segment", tokens=512) == cost("segment", tokens=16)  # weights read once per run
    assert cost("dense", slot_range=64) > cost("dense", slot_range=4)  # flops through the whole range


@pytest.mark.parametrize("tokens_per_slot", [1, 40])
@pytest.mark.parametrize("high_slot", [2, 39])
@pytest.mark.parametrize("strategy", ["segment", "dense", "gather", "auto"])
def test_every_strategy_computes_each_tokens_own_delta(tokens_per_slot, high_slot, strategy):
    """Against a per-token loop: y[t] += x[t] @ A[s].T @ B[s], nothing for the null slot."""
    torch.manual_seed(0)
    num_slots, rank, d_in, d_out = 40, 8, 12, 10
    null = num_slots
    lora_a = torch.randn(num_slots + 1, rank, d_in)
    lora_b = torch.randn(num_slots + 1, rank, d_out)  # B transposed, slot-major
    lora_a[null] = 0
    lora_b[null] = 0
    lora_a[1, 4:] = 0  # slot 1 holds a rank-4 adapter, zero-padded
    lora_b[1, 4:] = 0
    used = [0, null, 1, high_slot]
    slots = [s for s in used for _ in range(tokens_per_slot)]
    x = torch.randn(len(slots), d_in)
    y = torch.randn(len(slots), d_out)
    expected = y.clone()
    for t, s in enumerate(slots):
        expected[t] += x[t] @ lora_a[s].T @ lora_b[s]
    batch = build_lora_batch(slots, {0: 8, 1: 4, high_slot: 8}, rank, CPU, strategy)
    add_lora_delta(y, x, lora_a, lora_b, batch)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    base_rows = slice(tokens_per_slot, 2 * tokens_per_slot)
    assert torch.equal(y[base_rows], expected[base_rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_slot_rewritten_with_a_lower_rank_adapter_keeps_nothing_of_the_previous_one(dtype):
    base = torch.nn.Linear(6, 5, bias=False)
    layer = LoraLinear(base, num_slots=2, max_rank=8, dtype=dtype, context=LoraContext())
    a8, b8 = torch.randn(8, 6), torch.randn(5, 8)
    a4, b4 = torch.randn(4, 6), torch.randn(5, 4)
    layer.write_slot(1, a8, b8, scaling=2.0)
    layer.write_slot(1, a4, b4, scaling=0.5)

    assert torch.equal(layer.lora_a[1, :4], a4.to(dtype))
    assert torch.equal(layer.lora_b[1, :4], (b4 * 0.5).T.to(dtype))
    assert not layer.lora_a[1, 4:].any() and not layer.lora_b[1, 4:].any()
    layer.write_slot(1, None, None, 0.0)
    assert not layer.lora_a.any() and not layer.lora_b.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_slot_image_copies_exactly_what_the_in_place_write_stores(dtype):
    """CUDA writes a prepared image (pinned, async); CPU scales in place: the stacks must hold the same bits."""
    wrappers = {name: LoraLinear(torch.nn.Linear(6, 5, bias=False), num_slots=2, max_rank=8, dtype=dtype, context=LoraContext())
                for name in ("in_place", "image")}  # fmt: skip
    weights = LoraWeights(torch.randn(4, 6), torch.randn(5, 4), 0.37)
    adapter = LoraAdapter("a", 4, 1.48, False, ["q_proj"], {"image": weights}, 0)
    wrappers["in_place"].write_slot(1, weights.lora_a, weights.lora_b, weights.scaling)
    image = make_image(adapter, dtype, pin=False)
    wrappers["image"].copy_slot(1, *image.pairs["image"], non_blocking=False)
    assert torch.equal(wrappers["image"].lora_a, wrappers["in_place"].lora_a)
    assert torch.equal(wrappers["image"].lora_b, wrappers["in_place"].lora_b)
    wrappers["image"].copy_slot(1, None, None, non_blocking=False)
    assert not wrappers["image"].lora_a.any() and not wrappers["image"].lora_b.any()

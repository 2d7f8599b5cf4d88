"""The host tier: adapters read from disk on demand into a bounded LRU, never evicted while needed.

Unit tests drive `HostTier` with a fake read; engine tests drive real adapters from disk through a
budget smaller than the working set, and compare every output with PEFT's token for token.
"""

import shutil
import threading
import time

import pytest
from safetensors.torch import load_file, save_file

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.host_tier import HostLimits, HostState, HostTier
from loraplex.engine.request import FinishReason, SamplingParams
from loraplex.engine.slot_writer import SlotImage
from loraplex.errors import AdapterInvalid, AdapterNotFound
from loraplex.lora import files
from loraplex.lora.adapter import AdapterSource, LoraAdapter, read_adapter_dir

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPT = [5, 17, 42, 9, 33, 21, 8]


def fake(name: str, nbytes: int = 100) -> LoraAdapter:
    return LoraAdapter(name, 4, 8.0, False, ["q_proj"], None, nbytes, source=AdapterSource(f"/store/{name}", "v1"))


class Reads:
    """A fake read: records what was read; `gate` holds reads back until set; `broken` names fail."""

    def __init__(self):
        self.read: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.broken: set[str] = set()
        self.woken = threading.Event()

    def __call__(self, adapter: LoraAdapter) -> SlotImage:
        self.gate.wait(10)
        self.read.append(adapter.name)
        if adapter.name in self.broken:
            raise AdapterInvalid(f"module m: lora_B of {adapter.name} holds non-finite values")
        return SlotImage({})


def make_tier(reads: Reads, max_bytes: int = 250, max_count: int | None = None) -> HostTier:
    return HostTier(HostLimits(max_bytes, max_count, 2), reads, lambda adapter: SlotImage({}), reads.woken.set)


def settle(tier: HostTier, in_slot=lambda adapter: False) -> list[LoraAdapter]:
    """Poll until no read is in flight (bounded)."""
    failed = []
    for _ in range(200):
        failed += tier.poll(in_slot)
        if not tier.loading():
            return failed
        time.sleep(0.01)
    raise AssertionError("reads did not finish")


@pytest.fixture
def reads():
    return Reads()


def test_a_miss_reads_the_adapter_off_the_engine_thread_and_a_later_request_hits(reads):
    tier, a = make_tier(reads), fake("a")
    assert tier.acquire(a) is HostState.LOADING
    settle(tier)
    assert reads.woken.is_set() and tier.ready(a) and tier.bytes == 100
    tier.release(a)
    assert tier.acquire(a) is HostState.READY
    assert (tier.stats.misses, tier.stats.hits, tier.stats.loads, reads.read) == (1, 1, 1, ["a"])


def test_the_least_recently_used_idle_adapter_is_evicted_past_the_byte_budget(reads):
    tier = make_tier(reads, max_bytes=250)
    a, b, c = fake("a"), fake("b"), fake("c")
    for adapter in (a, b):
        tier.acquire(adapter)
    settle(tier)
    tier.release(a)
    tier.release(b)
    tier.acquire(a)  # a is now the most recently used
    tier.release(a)
    tier.acquire(c)
    settle(tier)
    assert [tier.ready(x) for x in (a, b, c)] == [True, False, True]
    assert tier.bytes == 200 and tier.stats.evictions == 1


@pytest.mark.parametrize("holds", ["a request", "a slot", "the configuration"])
def test_an_adapter_in_use_is_never_evicted_even_past_the_budget(reads, holds):
    tier = make_tier(reads, max_bytes=150)
    a, b = fake("a"), fake("b")
    tier.acquire(a)
    settle(tier)
    if holds != "a request":
        tier.release(a)
    if holds == "the configuration":
        tier.pin(a)
    in_slot = (lambda adapter: adapter is a) if holds == "a slot" else (lambda adapter: False)
    tier.acquire(b)
    settle(tier, in_slot)
    assert tier.ready(a) and tier.ready(b) and tier.bytes == 200  # over budget rather than evict what is needed
    tier.release(b)
    tier.poll(in_slot)
    assert tier.ready(a) and not tier.ready(b)


def test_the_count_bound_evicts_as_the_byte_bound_does(reads):
    tier = make_tier(reads, max_bytes=10_000, max_count=1)
    a, b = fake("a"), fake("b")
    tier.acquire(a)
    settle(tier)
    tier.release(a)
    tier.acquire(b)
    settle(tier)
    assert not tier.ready(a) and tier.ready(b) and tier.ready_count == 1


def test_a_failed_read_fails_that_version_only_and_names_why(reads):
    tier = make_tier(reads)
    reads.broken.add("bad")
    bad, good = fake("bad"), fake("good")
    tier.acquire(bad)
    tier.acquire(good)
    failed = settle(tier)
    assert failed == [bad] and tier.state(bad) is HostState.FAILED and tier.ready(good)
    assert "non-finite" in str(tier.error(bad)) and tier.stats.failures == 1
    assert tier.acquire(bad) is HostState.FAILED  # known bad: not read again


def test_a_retired_version_is_dropped_once_nothing_uses_it(reads):
    tier = make_tier(reads, max_bytes=10_000)
    a = fake("a")
    tier.acquire(a)
    settle(tier)
    tier.retire(a)
    tier.poll(lambda adapter: False)
    assert tier.ready(a)  # a request still holds it
    tier.release(a)
    tier.poll(lambda adapter: False)
    assert tier.state(a) is None and tier.bytes == 0 and tier.stats.evictions == 0


def test_changes_are_recorded_only_when_asked_and_taken_once(reads):
    tier = make_tier(reads)
    a = fake("a")
    tier.acquire(a)
    settle(tier)
    assert tier.take_changes() == {}
    tier.record_changes = True
    tier.release(a)
    tier.retire(a)
    tier.poll(lambda adapter: False)
    assert tier.take_changes() == {a.uid: None} and tier.take_changes() == {}


# ----- the engine, with real adapters from disk ----------------------------------------------------

NAMES = ("r4-qv", "r8-attn", "r16-mlp", "r8-all-rslora")


def make_engine(llama, **fields) -> Engine:
    config = dict(model=str(llama.model_dir), dtype="float32", device="cpu", max_loras=1, max_lora_rank=16, max_model_len=64)
    engine = Engine(EngineConfig(**{**config, **fields}))
    for name in NAMES:
        engine.load_adapter(name, llama.adapter_dirs[name])
    return engine


@pytest.fixture(scope="module")
def expected(llama, oracle) -> dict[str, list[int]]:
    return {name: oracle.generate(PROMPT, name, MAX_TOKENS)[0] for name in NAMES}


def test_a_host_budget_under_the_working_set_still_gives_peft_exact_outputs(llama, expected):
    one = make_engine(llama).adapters["r16-mlp"].nbytes
    engine = make_engine(llama, max_cpu_lora_bytes=one)  # room for about one adapter at a time
    for names in (NAMES, NAMES[::-1], NAMES[:2] * 2):  # each round reads back what the last evicted
        completions = engine.generate([PROMPT] * len(names), list(names), GREEDY)
        assert [c.output_ids for c in completions] == [expected[name] for name in names]
    stats = engine.host.stats
    assert stats.evictions > 0 and stats.loads > len(NAMES)
    assert engine.host.bytes <= one or engine.host.ready_count <= 1


def test_a_request_waiting_for_its_adapters_read_does_not_hold_up_others(llama, expected, monkeypatch):
    engine = make_engine(llama, max_loras=2)
    engine.prefetch(["r4-qv"])
    gate = threading.Event()
    read = engine.host._read

    def slow_read(adapter):
        if adapter.name == "r8-attn":
            assert gate.wait(30)
        return read(adapter)

    monkeypatch.setattr(engine.host, "_read", slow_read)
    events: dict[str, list] = {"r4-qv": [], "r8-attn": []}
    engine.add_request(PROMPT, "r8-attn", GREEDY, sink=events["r8-attn"].append)  # cold, first in line
    engine.add_request(PROMPT, "r4-qv", GREEDY, sink=events["r4-qv"].append)
    for _ in range(50):
        engine.step()
        if events["r4-qv"] and events["r4-qv"][-1].finish_reason is not None:
            break
    assert [e.token_id for e in events["r4-qv"] if e.token_id is not None] == expected["r4-qv"]
    assert not events["r8-attn"] and engine.adapter_tier(engine.adapters["r8-attn"]) == "loading"
    gate.set()
    deadline = time.monotonic() + 30
    while engine.scheduler.has_work() and time.monotonic() < deadline:
        if not engine.step():
            time.sleep(0.01)
    assert [e.token_id for e in events["r8-attn"] if e.token_id is not None] == expected["r8-attn"]


def test_a_version_replaced_on_disk_before_it_was_read_is_refused_and_fails_only_its_request(llama, expected, tmp_path):
    directory = tmp_path / "moving"
    shutil.copytree(llama.adapter_dirs["r8-attn"], directory)
    engine = make_engine(llama, max_loras=2)
    engine.load_adapter("moving", directory)
    shutil.rmtree(directory)
    shutil.copytree(llama.adapter_dirs["r4-qv"], directory)  # another adapter under the same path
    moving, other = engine.generate([PROMPT, PROMPT], ["moving", "r16-mlp"], GREEDY)
    assert moving.finish_reason is FinishReason.ERROR
    assert other.output_ids == expected["r16-mlp"]
    assert engine.host.stats.failures == 1
    with pytest.raises(AdapterNotFound, match="replaced or deleted"):
        engine.prefetch(["moving"])


def test_weights_that_fail_validation_when_read_fail_their_requests_with_the_reason(llama, expected, tmp_path):
    directory = tmp_path / "nan"
    shutil.copytree(llama.adapter_dirs["r8-attn"], directory)
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors[next(key for key in tensors if "lora_B" in key)][0, 0] = float("nan")
    save_file(tensors, directory / "adapter_model.safetensors")
    engine = make_engine(llama, max_loras=2)
    engine.register_adapter(engine.index_adapter("nan", directory))  # the header is fine: the values are not
    events = []
    engine.add_request(PROMPT, "nan", GREEDY, sink=events.append)
    good = engine.generate([PROMPT], ["r4-qv"], GREEDY)[0]
    deadline = time.monotonic() + 30
    while engine.scheduler.has_work() and time.monotonic() < deadline:
        if not engine.step():
            time.sleep(0.01)
    assert events[-1].finish_reason is FinishReason.ERROR and events[-1].error_type == "AdapterInvalid"
    assert "non-finite" in events[-1].error and "'nan'" in events[-1].error
    assert good.output_ids == expected["r4-qv"]
    assert engine.adapter_tier(engine.adapters["nan"]) == "failed"


def test_a_pinned_adapter_is_read_at_registration_and_kept(llama):
    engine = make_engine(llama, max_cpu_lora_bytes=0, pin_adapters=("r8-attn",))
    engine.prefetch([])  # drains the registration
    deadline = time.monotonic() + 30
    while engine.host.loading() and time.monotonic() < deadline:
        time.sleep(0.01)
        engine.step()
    assert engine.adapter_tier(engine.adapters["r8-attn"]) == "host"
    engine.generate([PROMPT, PROMPT], ["r4-qv", "r16-mlp"], GREEDY)
    assert engine.adapter_tier(engine.adapters["r8-attn"]) == "host"  # a zero budget evicts all but it ...
    others = sorted(engine.adapter_tier(engine.adapters[name]) for name in ("r4-qv", "r16-mlp"))
    assert others == ["device", "disk"]  # ... and the one in the only slot


def test_an_indexed_adapter_reads_its_config_and_header_only(llama, monkeypatch):
    engine = make_engine(llama)
    read_whole = []
    whole = files._read_bounded
    monkeypatch.setattr(files, "_read_bounded", lambda fd, name, *rest: read_whole.append(name) or whole(fd, name, *rest))
    adapter = engine.index_adapter("indexed", llama.adapter_dirs["r8-all-rslora"])
    assert "adapter_model.safetensors" not in read_whole
    full = engine.validate_adapter("full", *read_adapter_dir(llama.adapter_dirs["r8-all-rslora"]))
    assert adapter.modules is None
    assert (adapter.rank, adapter.nbytes, adapter.target_modules) == (full.rank, full.nbytes, full.target_modules)

"""One request never fails another: faults inside a step stay with the request that caused them.

Each test runs a batch that mixes the base model and several adapters with one faulty request
(an adapter whose weights were poisoned after validation, a forward pass that raises for one
request, a listener that breaks), and checks that the faulty request ends with an error naming
it while every other request's tokens equal the tokens it gets when run alone. Outputs are
compared exactly (float32, greedy).
"""

import time
from dataclasses import dataclass, field

import pytest

import loraplex.engine.ops.backend as ops_backend
from loraplex.config import EngineConfig
from loraplex.engine.engine import MAX_FAILED_STEPS, Engine
from loraplex.engine.request import FinishReason, SamplingParams, TokenEvent
from loraplex.errors import EngineUnavailable
from loraplex.lora.adapter import read_adapter_dir

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LONG_PROMPT = list(range(3, 43))  # 40 tokens: a prefill with long adapter segments
SHORT_PROMPT = [5, 6, 7, 8]
MIXED = [(None, LONG_PROMPT), ("r4-qv", SHORT_PROMPT), ("r8-attn", LONG_PROMPT), ("r16-mlp", SHORT_PROMPT)]


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    error: str | None = None

    def __call__(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        if event.finish_reason is not None:
            self.finish, self.error = event.finish_reason, event.error


def run(engine: Engine, jobs: list[tuple[str | None, list[int]]], sinks: dict[int, object] | None = None,
        late: frozenset[int] = frozenset()) -> list[Outcome]:  # fmt: skip
    """Run `jobs` (adapter, prompt) to the end in shared steps.

    `sinks` replaces some listeners; jobs in `late` join after the first step, so their prefill
    shares a step with the others' decodes (the dense and gather strategies, not segments).
    """
    outcomes = [Outcome() for _ in jobs]

    def add(indexes) -> None:
        for index in indexes:
            adapter, prompt = jobs[index]
            engine.add_request(prompt, adapter, GREEDY, sink=(sinks or {}).get(index, outcomes[index]))
        engine._drain_inbox()

    add(i for i in range(len(jobs)) if i not in late)
    engine.step()
    add(sorted(late))
    for _ in range(200):
        if not engine.scheduler.has_work():
            break
        engine.step()
    assert not engine.scheduler.has_work()
    return outcomes


def alone(engine: Engine, jobs) -> list[list[int]]:
    return [run(engine, [job])[0].tokens for job in jobs]


def make_engine(llama, lora_strategy: str) -> Engine:
    engine = Engine(EngineConfig(model=str(llama.model_dir), dtype="float32", device="cpu", max_loras=4,
                                 max_lora_rank=16, max_model_len=128, lora_strategy=lora_strategy))  # fmt: skip
    for name in ("r4-qv", "r8-attn", "r16-mlp", "r8-all-rslora"):
        engine.load_adapter(name, llama.adapter_dirs[name])
    engine.prefetch()  # the steps below are counted: no request may wait on a read from disk
    return engine


@pytest.fixture(scope="module", params=["dense", "gather", "segment"])
def engine(request, llama):
    """Each LoRA strategy forced, prefill and decode: a bad row must stay in its own request in all."""
    return make_engine(llama, request.param)


@pytest.fixture
def poisoned(engine, llama):
    """An adapter registered past validation and then given non-finite weights (a bug that let it in)."""

    def poison(where: str, value: float):
        adapter = engine.validate_adapter("poisoned", *read_adapter_dir(llama.adapter_dirs["r8-all-rslora"]))
        for weights in adapter.modules.values():
            getattr(weights, where)[0, 0] = value
        engine.register_adapter(adapter)  # built in memory: served as it is, never read back
        return adapter

    yield poison
    engine.remove_adapter("poisoned")
    engine._drain_inbox()


def assert_clean(engine: Engine) -> None:
    assert engine.kv_cache.allocator.usage == 0
    assert engine._queued == 0
    assert all(engine.slots.refcount(a) == 0 for a in engine.adapters.values())


@pytest.mark.parametrize(("where", "value"), [("lora_a", float("nan")), ("lora_b", float("nan")), ("lora_b", float("inf"))])
def test_a_poisoned_adapter_fails_its_own_request_and_no_other(engine, poisoned, where, value):
    expected = alone(engine, MIXED)
    poisoned(where, value)

    outcomes = run(engine, [*MIXED[:2], ("poisoned", SHORT_PROMPT), *MIXED[2:]], late=frozenset({2}))

    victim = outcomes.pop(2)
    assert victim.finish is FinishReason.ERROR
    assert "not finite" in victim.error and "'poisoned'" in victim.error
    assert [o.tokens for o in outcomes] == expected
    assert all(o.finish is FinishReason.LENGTH for o in outcomes)
    assert_clean(engine)


def test_a_forward_pass_that_raises_for_one_request_fails_that_request_alone(engine, monkeypatch):
    expected = alone(engine, MIXED)
    victim = engine.adapters["r8-attn"]
    original = ops_backend.add_lora_delta

    def breaks_on_the_victims_slot(y, x, lora_a, lora_b, batch):
        if engine.slots.is_resident(victim) and engine.slots.slot_of(victim) in {s for s, *_ in batch.segments}:
            raise RuntimeError("kernel fault")
        return original(y, x, lora_a, lora_b, batch)

    monkeypatch.setattr(ops_backend, "add_lora_delta", breaks_on_the_victims_slot)
    outcomes = run(engine, MIXED)

    assert outcomes[2].finish is FinishReason.ERROR and "RuntimeError: kernel fault" in outcomes[2].error
    assert "'r8-attn'" in outcomes[2].error
    assert [o.tokens for i, o in enumerate(outcomes) if i != 2] == [t for i, t in enumerate(expected) if i != 2]
    assert_clean(engine)


def test_a_listener_that_breaks_fails_only_its_own_request(engine):
    expected = alone(engine, MIXED)
    calls = []

    def broken(event: TokenEvent) -> None:
        calls.append(event)
        raise RuntimeError("client gone wrong")

    outcomes = run(engine, MIXED, sinks={1: broken})

    assert len(calls) == 2, "the failing token, then the error event; nothing after"
    assert calls[-1].finish_reason is FinishReason.ERROR and "client gone wrong" in calls[-1].error
    assert [o.tokens for i, o in enumerate(outcomes) if i != 1] == [t for i, t in enumerate(expected) if i != 1]
    assert_clean(engine)


@pytest.mark.parametrize(
    ("sampling", "same_as"),
    [
        (dict(seed=2**64 + 7, temperature=1.0), dict(seed=7, temperature=1.0)),
        (dict(seed=-(2**63), temperature=1.0), dict(seed=2**63, temperature=1.0)),
        (dict(temperature=1e-40), dict(temperature=0)),
        (dict(seed=3, top_k=2**63), dict(seed=3, top_k=0)),
        (dict(seed=3, top_k=10**6, top_p=0.5), dict(seed=3, top_p=0.5)),
    ],
    ids=["seed-past-64-bits", "negative-seed", "denormal-temperature", "top-k-past-int64", "top-k-past-vocab"],
)
def test_numbers_past_the_engines_types_sample_like_their_in_range_equivalent(engine, sampling, same_as):
    def tokens(fields: dict) -> list[int]:
        outcome = Outcome()
        engine.add_request(SHORT_PROMPT, "r4-qv", SamplingParams(max_tokens=8, ignore_eos=True, **fields), sink=outcome)
        engine._drain_inbox()
        while engine.scheduler.has_work():
            engine.step()
        assert outcome.finish is FinishReason.LENGTH, outcome.error
        return outcome.tokens

    assert tokens(sampling) == tokens(same_as)


def wait_for(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_steps_that_fail_every_request_stop_the_engine_and_it_refuses_new_work(llama, monkeypatch):
    engine = make_engine(llama, "auto")

    def device_lost(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", device_lost)
    engine.start()
    try:
        outcomes = []
        for _ in range(MAX_FAILED_STEPS):  # one request per step, each step failing all it holds
            outcomes.append(Outcome())
            engine.add_request(SHORT_PROMPT, None, GREEDY, sink=outcomes[-1])
            wait_for(lambda: outcomes[-1].finish is not None)
        wait_for(lambda: not engine.alive)

        assert "device lost" in engine.failure
        assert all(o.finish is FinishReason.ERROR and "device lost" in o.error for o in outcomes)
        with pytest.raises(EngineUnavailable, match="device lost"):
            engine.add_request(SHORT_PROMPT, None, GREEDY)
    finally:
        engine.stop()

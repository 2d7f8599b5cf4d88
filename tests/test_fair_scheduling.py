"""Tenant-fair admission in the engine: the least-served tenant goes first, weights set shares, outputs never change."""

import openai
import pytest

from live_server import LiveServer, server_config
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PROMPT = [5, 17, 42, 9, 33, 21, 8, 11]


def make_engine(llama, **fields) -> Engine:
    config = dict(model=str(llama.model_dir), dtype="float32", device="cpu", max_loras=2, max_lora_rank=16, max_model_len=64)
    engine = Engine(EngineConfig(**{**config, **fields}))
    engine.load_adapter("r4-qv", llama.adapter_dirs["r4-qv"])
    engine.prefetch()
    return engine


def admission_order(engine: Engine, jobs: list[tuple[str, str | None]]) -> list[str]:
    """Queue `jobs` (tenant, adapter) in order, run them all, and return the tenants in the order they were admitted."""
    admitted: list[str] = []
    names = {}
    for index, (tenant, adapter) in enumerate(jobs):
        request_id = engine.add_request(PROMPT, adapter, GREEDY, f"{tenant}-{index}", tenant=tenant, bounded=False)
        names[request_id] = tenant
    engine._drain_inbox()
    for _ in range(500):
        if not engine.scheduler.has_work():
            break
        before = {id(r) for r in engine.scheduler.running}
        engine.step()
        # Every request runs at least two steps (4 tokens), so each is seen running after the step that admitted it.
        admitted += [names[r.request_id] for r in engine.scheduler.running if id(r) not in before]
    assert not engine.scheduler.has_work()
    return admitted


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_a_light_tenant_is_not_queued_behind_a_heavy_tenants_backlog(llama, policy):
    engine = make_engine(llama, max_num_seqs=2, scheduling=policy)
    jobs = [("heavy", None)] * 10 + [("light", "r4-qv")] * 2
    order = admission_order(engine, jobs)
    light_at = [index for index, tenant in enumerate(order) if tenant == "light"]
    if policy == "fair":
        assert light_at[-1] <= 4  # admitted as soon as a sequence frees up, ahead of heavy's backlog
    else:
        assert light_at == [10, 11]  # first come, first served


def test_weights_set_each_tenants_share_of_a_busy_engine(llama):
    engine = make_engine(llama, max_num_seqs=1, scheduling="fair", tenant_weights={"gold": 3.0})
    jobs = [("gold", None), ("plain", None)] * 12
    order = admission_order(engine, jobs)
    first = order[:12]
    assert 8 <= first.count("gold") <= 10  # about 3 of every 4 while both are backlogged
    assert order[12:].count("plain") >= 8  # then plain catches up on what gold has left


def test_fair_scheduling_changes_no_output(llama):
    jobs = [("a", None), ("b", "r4-qv"), ("a", "r4-qv"), ("c", None), ("b", None)]
    outputs = {}
    for policy in ("fair", "fcfs"):
        engine = make_engine(llama, max_num_seqs=2, scheduling=policy)
        events: dict[int, list[int]] = {index: [] for index in range(len(jobs))}
        for index, (tenant, adapter) in enumerate(jobs):
            engine.add_request(
                PROMPT[: 4 + index], adapter, GREEDY, sink=lambda e, i=index: events[i].append(e.token_id), tenant=tenant
            )
        engine._drain_inbox()
        while engine.scheduler.has_work():
            engine.step()
        outputs[policy] = events
    assert outputs["fair"] == outputs["fcfs"]
    alone = [make_engine(llama).generate([PROMPT[: 4 + i]], [adapter], GREEDY)[0].output_ids for i, (_, adapter) in enumerate(jobs)]
    assert [[t for t in outputs["fair"][i] if t is not None] for i in range(len(jobs))] == alone


def test_a_served_request_is_counted_to_its_keys_tenant_with_the_keys_file_weight(llama, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nkey = "sk-gold-0123456789"\ntenant = "gold"\nweight = 4\n\n'
        '[[keys]]\nkey = "sk-plain-0123456789"\ntenant = "plain"\n'
    )
    with LiveServer(server_config(llama.model_dir, tmp_path / "store", api_keys=keys)) as server:
        for key in ("sk-gold-0123456789", "sk-plain-0123456789"):
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
            client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=4, temperature=0)
        engine = server.engine
        assert engine.config.tenant_weights == {"gold": 4.0, "plain": 1.0}
        counters = engine.scheduler.waiting.counters()
        service = len(PROMPT) + 2 * 3  # the prompt, then 3 decodes (the first token comes from the prefill)
        assert counters["gold"] == pytest.approx(service / 4)
        assert counters["plain"] == pytest.approx(counters["gold"] + service)  # lifted to gold's, the last to leave

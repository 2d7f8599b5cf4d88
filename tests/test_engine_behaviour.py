"""The engine as its callers see it: scheduling limits, sampling, stops, cancel, async streams."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, SamplingParams
from loraplex.errors import AdapterNotFound, RequestInvalid
from test_engine_matches_peft import prompt_of

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def make_engine(setup, **overrides) -> Engine:
    fields = dict(model=str(setup.model_dir), max_loras=4, max_lora_rank=16)
    fields.update(overrides)
    engine = Engine(EngineConfig(**fields))
    for name, path in setup.adapter_dirs.items():
        engine.load_adapter(name, path)
    engine.prefetch()  # some tests count steps: none may wait on a read from disk
    return engine


def record_steps(engine: Engine) -> list:
    """Wrap the runner to record, for every step, (tokens, sequences, distinct adapters)."""
    steps = []
    run = engine.runner.run

    def recording_run(batch, null_slot):
        adapters = {seq.request.adapter.name for seq in batch if seq.request.adapter is not None}
        steps.append((sum(seq.length for seq in batch), len(batch), adapters))
        return run(batch, null_slot)

    engine.runner.run = recording_run
    return steps


def alone(engine: Engine, prompt, adapter, params=GREEDY) -> list[int]:
    return engine.generate([prompt], [adapter], params)[0].output_ids


def test_token_budget_chunks_long_prompts(llama):
    engine = make_engine(llama, max_num_batched_tokens=16, max_num_seqs=4)
    steps = record_steps(engine)
    prompts = [prompt_of(40, 1), prompt_of(5, 2)]
    completions = engine.generate(prompts, ["r4-qv", None], GREEDY)
    assert max(tokens for tokens, _, _ in steps) <= 16
    assert completions[0].output_ids == alone(make_engine(llama), prompts[0], "r4-qv")


def test_running_sequences_are_capped(llama):
    engine = make_engine(llama, max_num_seqs=3)
    steps = record_steps(engine)
    engine.generate([prompt_of(4, i) for i in range(7)], [None] * 7, GREEDY)
    assert max(seqs for _, seqs, _ in steps) == 3


def test_a_step_mixes_at_most_max_loras_adapters(llama):
    engine = make_engine(llama, max_loras=2)
    steps = record_steps(engine)
    names = ["r4-qv", "r8-attn", "r16-mlp", "r8-all-rslora", "r4-patterns", None]
    prompts = [prompt_of(6, i) for i in range(len(names))]
    completions = engine.generate(prompts, names, GREEDY)
    assert max(len(adapters) for _, _, adapters in steps) == 2
    reference = make_engine(llama, max_loras=8)
    for prompt, name, completion in zip(prompts, names, completions):
        assert completion.output_ids == alone(reference, prompt, name)


def test_a_request_waiting_for_a_slot_is_not_starved(llama):
    """One slot, a steady stream of requests for the resident adapter: the other one still runs."""
    engine = make_engine(llama, max_loras=1, max_slot_bypass=2, max_num_seqs=8)
    long = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    events = []
    engine.add_request(prompt_of(4, 0), "r4-qv", long, sink=events.append)
    starved_id = engine.add_request(prompt_of(4, 1), "r8-attn", long, sink=events.append)
    for i in range(30):
        engine.add_request(prompt_of(4, 10 + i), "r4-qv", long, sink=events.append)
        engine.step()
        if any(e.request_id == starved_id and e.finish_reason for e in events):
            break
    finished = [e for e in events if e.request_id == starved_id and e.finish_reason]
    assert finished, "the r8-attn request never finished"
    engine.generate([], [], GREEDY)  # drain the rest


def test_seeded_sampling_is_reproducible_whatever_shares_the_step(llama):
    engine = make_engine(llama)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = prompt_of(6, 3)
    first = alone(engine, prompt, "r8-attn", params)
    crowded = engine.generate(
        [prompt_of(9, 4), prompt, prompt_of(3, 5)],
        ["r16-mlp", "r8-attn", None],
        [SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True), params, GREEDY],
    )[1]
    assert crowded.output_ids == first
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert alone(engine, prompt, "r8-attn", other_seed) != first


def test_top_k_one_is_greedy(llama):
    engine = make_engine(llama)
    prompt = prompt_of(7, 6)
    sampled = SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=5, ignore_eos=True)
    assert alone(engine, prompt, "r4-qv", sampled) == alone(engine, prompt, "r4-qv")


def test_logprobs_are_log_softmax_of_the_model(llama):
    engine = make_engine(llama)
    prompt = prompt_of(5, 7)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    completion = engine.generate([prompt], [None], params)[0]
    model = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].log_softmax(-1)  # [P, V]
    token = completion.output_ids[0]
    assert completion.logprobs[0] == pytest.approx(expected[-1, token].item(), abs=1e-5)
    top_ids = [t for t, _ in completion.top_logprobs[0]]
    assert top_ids == expected[-1].topk(3).indices.tolist()
    assert top_ids[0] == token  # greedy picks the best
    assert len(completion.prompt_logprobs) == len(prompt) - 1
    for position, (logprob, top, rank) in enumerate(completion.prompt_logprobs):
        row, target = expected[position], prompt[position + 1]
        assert logprob == pytest.approx(row[target].item(), abs=1e-5)
        assert len(top) == 2
        assert rank == int((row > row[target]).sum()) + 1  # vLLM's rank: 1 for the most likely token


def test_stop_token_ids_and_max_tokens_finish_requests(llama):
    engine = make_engine(llama)
    prompt = prompt_of(5, 8)
    free = engine.generate([prompt], [None], GREEDY)[0]
    assert free.finish_reason is FinishReason.LENGTH and len(free.output_ids) == 8
    stop_at = free.output_ids[3]
    stopped = engine.generate(
        [prompt], [None], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop_at,))
    )[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.output_ids == free.output_ids[: free.output_ids.index(stop_at) + 1]


def test_stop_strings_cut_the_text_before_them(llama):
    engine = make_engine(llama)
    prompt = prompt_of(5, 9)
    free = engine.generate([prompt], [None], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    text = free.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 1) if text[i : i + 2].isprintable() and text[i : i + 2].strip())
    cut = text.index(stop)
    stopped = engine.generate(
        [prompt], [None], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,))
    )[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == text[:cut]


def test_cancel_frees_kv_blocks_and_the_slot_reference(llama):
    engine = make_engine(llama)
    free_blocks = engine.kv_cache.allocator.num_free
    events = []
    request_id = engine.add_request(prompt_of(30, 10), "r8-attn", SamplingParams(max_tokens=50, temperature=0), sink=events.append)
    engine.step()
    engine.step()
    adapter = engine.adapters["r8-attn"]
    assert engine.slots.refcount(adapter) == 1
    assert engine.kv_cache.allocator.num_free < free_blocks
    engine.cancel(request_id)
    engine.step()
    assert engine.slots.refcount(adapter) == 0
    assert engine.kv_cache.allocator.num_free == free_blocks
    assert events[-1].finish_reason is FinishReason.ABORT
    assert not engine.scheduler.has_work()


def test_replacing_an_adapter_lets_running_requests_finish_on_the_old_weights(llama):
    engine = make_engine(llama)
    prompt = prompt_of(6, 11)
    old_tokens = alone(engine, prompt, "r8-attn", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    new_tokens = alone(make_engine(llama), prompt, "r16-mlp", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    events = []
    engine.add_request(prompt, "r8-attn", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), sink=events.append)
    engine.step()
    old = engine.adapters["r8-attn"]
    engine.load_adapter("r8-attn", llama.adapter_dirs["r16-mlp"])  # same name, new weights
    replaced = engine.generate([prompt], ["r8-attn"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [e.token_id for e in events] == old_tokens
    assert replaced[0].output_ids == new_tokens
    assert not engine.slots.is_resident(old)


def test_bad_requests_are_refused_before_queueing(llama):
    engine = make_engine(llama, max_model_len=32)
    with pytest.raises(RequestInvalid, match="prompt is empty"):
        engine.add_request([], None, GREEDY)
    with pytest.raises(RequestInvalid, match="max_model_len is 32"):
        engine.add_request(prompt_of(40, 0), None, GREEDY)
    with pytest.raises(RequestInvalid, match=r"token ids must be in \[0, 256\)"):
        engine.add_request([5, 9999], None, GREEDY)
    with pytest.raises(AdapterNotFound):
        engine.add_request([5, 6], "nope", GREEDY)
    with pytest.raises(RequestInvalid, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(RequestInvalid, match="temperature"):
        SamplingParams(temperature=-1)
    assert not engine.scheduler.has_work()


def test_generation_stops_at_max_model_len(llama):
    engine = make_engine(llama, max_model_len=12)
    completion = engine.generate([prompt_of(8, 12)], [None], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert completion.finish_reason is FinishReason.LENGTH
    assert len(completion.output_ids) == 4


def test_async_streams_and_cancel_on_early_exit(llama):
    engine = make_engine(llama)
    prompt = prompt_of(6, 13)
    expected = alone(engine, prompt, "r4-qv", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))

    endings = {}  # request id -> finish reason, as the engine thread ends each request
    observe_finished = engine.observer.finished

    def finished(request, now: float) -> None:
        endings[request.request_id] = request.finish_reason
        observe_finished(request, now)

    engine.observer.finished = finished

    async def scenario():
        full = engine.submit(prompt, "r4-qv", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        partial = engine.submit(prompt, "r16-mlp", SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        tokens = [event.token_id async for event in full]
        async for _ in partial:
            break
        await partial.aclose()
        while partial.request_id not in endings:  # the cancel lands at the next step boundary
            await asyncio.sleep(0.02)
        return tokens, endings[partial.request_id]

    engine.start()
    try:
        tokens, partial_ending = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        engine.stop()
    assert tokens == expected
    assert partial_ending == FinishReason.ABORT  # cancelled, not run to its 500 tokens
    assert not engine.scheduler.has_work()
    assert engine.kv_cache.allocator.usage == 0
    assert engine.slots.refcount(engine.adapters["r16-mlp"]) == 0

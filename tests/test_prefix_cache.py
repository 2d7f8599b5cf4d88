"""Automatic prefix caching (issue 16): the cache's books, then the engine's outputs with it on.

The cache must never change an output: greedy tokens are those of the same engine with the cache
off and those of PEFT, with shared prefixes across requests of one adapter, across adapters (never
shared), across versions of one adapter (never shared), through chunked prefill, preemption and
eviction. n requests with one prompt compute its full blocks once. Hits are counted in tokens, as
vLLM counts them, and exported on /metrics.
"""

from collections import Counter

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import PeftOracle
from live_server import LiveServer, server_config
from loadtest import prefix_cache as prefix_bench
from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.prefix_cache import extend_keys
from loraplex.engine.request import Completion, SamplingParams
from loraplex.tenancy import DEFAULT_TENANT
from test_engine_matches_peft import LOGIT_TOL, MAX_NEW, assert_matches, logits_of, logits_params, make_engine, prompt_of

MAX_STEPS = 2_000  # bound on the steps any test here runs
SYSTEM = prompt_of(40, 1)  # a shared "system prompt": two full blocks of 16, and 8 tokens more
# Against PEFT: identical tokens, logits within 1e-3. Prompts here are up to 92 tokens, where the
# engine with the cache off is up to 2.4e-4 from PEFT already (float32 sums in another order);
# with the cache on and off, logits must agree within LOGIT_TOL (here they agree bit for bit).
PEFT_TOL = 1e-3


# ----- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, second, same",
    [
        (([1] * 8, None), ([1] * 8, None), [True, True]),
        (([1] * 8, None), ([1] * 8, "uid-a"), [False, False]),  # the base model and an adapter
        (([1] * 8, "uid-a"), ([1] * 8, "uid-b"), [False, False]),  # two versions of one adapter
        (([1] * 4 + [2] * 4, None), ([1] * 4 + [3] * 4, None), [True, False]),
        (([2] + [1] * 7, None), ([3] + [1] * 7, None), [False, False]),  # block 1 differs only through its parent
    ],
)
def test_a_blocks_key_names_its_tokens_its_prefix_and_its_adapter_version(first, second, same):
    keys_a = extend_keys([], first[0], 4, first[1])
    keys_b = extend_keys([], second[0], 4, second[1])
    assert [a == b for a, b in zip(keys_a, keys_b, strict=True)] == same


def test_a_tenants_blocks_have_keys_of_its_own():
    tokens = [1] * 8
    keys = {tenant: extend_keys([], tokens, 4, "uid", tenant) for tenant in (None, "acme", "globex", "acme")}
    assert len({tuple(k) for k in keys.values()}) == 3
    assert extend_keys([], tokens, 4, "uid", "acme") == keys["acme"]


def test_only_full_blocks_have_keys_and_extending_equals_computing_at_once():
    tokens = list(range(11))
    grown = extend_keys([], tokens[:5], 4, "uid")
    assert len(grown) == 1
    assert extend_keys(grown, tokens, 4, "uid") == extend_keys([], tokens, 4, "uid")
    assert len(grown) == 2


# ----- the cache's books: reference counts and LRU, on an allocator of four blocks ----------------
# ops: ("alloc", table, n) | ("cache", table, keys) (one per leading block) | ("hit", table, keys)
# (look up, hold the run found) | ("free", table) | ("forget", table)
# expected: num_free (free list + idle cached), num_idle, {keys looked up: blocks found}

BOOK_CASES = {
    "a freed cached block stays cached, idle, and counts as free": (
        [("alloc", "a", 2), ("cache", "a", "xy"), ("free", "a")],
        (4, 2, {"xy": 2}),
    ),
    "a hit holds the block, so it is not idle": (
        [("alloc", "a", 2), ("cache", "a", "xy"), ("free", "a"), ("hit", "b", "xy")],
        (2, 0, {"xy": 2}),
    ),
    "a block two tables hold stays held when one lets go": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("hit", "b", "x"), ("free", "a")],
        (3, 0, {"x": 1}),
    ),
    "the last holder letting go makes it idle": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("hit", "b", "x"), ("free", "a"), ("free", "b")],
        (4, 1, {"x": 1}),
    ),
    "eviction takes the least recently released first": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("free", "a"), ("alloc", "b", 1), ("cache", "b", "y"), ("free", "b"),
         ("alloc", "c", 3)],
        (1, 1, {"x": 0, "y": 1}),
    ),  # fmt: skip
    "within one table the tail is evicted first": (
        [("alloc", "a", 2), ("cache", "a", "xy"), ("free", "a"), ("alloc", "b", 3)],
        (1, 1, {"xy": 1}),
    ),
    "the free list is used before any cached block": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("free", "a"), ("alloc", "b", 3)],
        (1, 1, {"x": 1}),
    ),
    "a key cached already leaves the second block private": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("alloc", "b", 1), ("cache", "b", "x"), ("free", "b")],
        (3, 0, {"x": 1}),
    ),
    "a forgotten block is found no more and frees when its last holder lets go": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("hit", "b", "x"), ("forget", "a"), ("free", "a"), ("free", "b")],
        (4, 0, {"x": 0}),
    ),
    "a forgotten idle block is free at once": (
        [("alloc", "a", 1), ("cache", "a", "x"), ("free", "a"), ("forget", "a")],
        (4, 0, {"x": 0}),
    ),
}


def run_book(allocator: BlockAllocator, ops) -> dict[str, list[int]]:
    cache = allocator.prefix_cache
    tables: dict[str, list[int]] = {}
    for op in ops:
        kind, table = op[0], op[1]
        if kind == "alloc":
            tables[table] = allocator.allocate(op[2])
        elif kind == "cache":
            for key, block in zip(op[2], tables[table]):
                cache.insert(key.encode(), block)
        elif kind == "hit":
            tables[table] = cache.lookup([key.encode() for key in op[2]])
            cache.acquire(tables[table])
        elif kind == "free":
            allocator.free(tables[table])
        else:
            allocator.forget(tables[table])
    return tables


@pytest.mark.parametrize("ops, expected", list(BOOK_CASES.values()), ids=list(BOOK_CASES))
def test_prefix_cache_books(ops, expected):
    allocator = BlockAllocator(4)
    run_book(allocator, ops)
    num_free, num_idle, lookups = expected
    cache = allocator.prefix_cache
    assert (allocator.num_free, cache.num_idle) == (num_free, num_idle)
    assert {keys: len(cache.lookup([key.encode() for key in keys])) for keys in lookups} == lookups


def test_a_referenced_cached_block_is_never_handed_out():
    allocator = BlockAllocator(4)
    tables = run_book(allocator, [("alloc", "a", 4), ("cache", "a", "wxyz")])
    assert allocator.num_free == 0
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        allocator.allocate(1)
    assert [allocator.prefix_cache.refcount(block) for block in tables["a"]] == [1, 1, 1, 1]


def test_a_shared_block_counts_every_holder():
    allocator = BlockAllocator(4)
    tables = run_book(allocator, [("alloc", "a", 1), ("cache", "a", "x"), ("hit", "b", "x"), ("hit", "c", "x")])
    assert tables["b"] == tables["c"] == tables["a"]
    assert allocator.prefix_cache.refcount(tables["a"][0]) == 3


# ----- the engine ---------------------------------------------------------------------------------


def assert_blocks_consistent(engine) -> None:
    """No block is both held and reusable; a block held by several tables counts each of them."""
    allocator = engine.kv_cache.allocator
    cache = allocator.prefix_cache
    holders = Counter(block for request in engine.scheduler.running for block in request.block_table)
    assert cache.num_idle_in(holders) == 0
    assert allocator.num_free + len(holders) == allocator.num_blocks
    assert all(cache.refcount(block) == count for block, count in holders.items() if count > 1)


def run_checked(engine, prompts, adapters, params, tenant: str = DEFAULT_TENANT) -> list[Completion]:
    """`engine.generate` for `tenant`, stepping by hand and checking the block books after every step."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    collected = []
    for prompt, adapter, request_params in zip(prompts, adapters, params, strict=True):
        events = []
        engine.add_request(prompt, adapter, request_params, sink=events.append, bounded=False, tenant=tenant)
        collected.append(events)
    for _ in range(MAX_STEPS):
        engine.step()  # the first one takes the requests in
        assert_blocks_consistent(engine)
        if not engine.scheduler.has_work():
            break
    assert not engine.scheduler.has_work()
    return [Completion.from_events(events, prompt) for events, prompt in zip(collected, prompts)]


def record_chunks(engine) -> list[tuple[int, int, int]]:
    """Every chunk the engine's scheduler schedules from now on: (prompt length, start, length)."""
    chunks = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        chunks.extend((len(seq.request.prompt_ids), seq.start, seq.length) for seq in batch)
        return batch

    engine.scheduler.schedule = recording
    return chunks


def prompt_tokens_computed(chunks) -> int:
    return sum(max(0, min(start + length, prompt_len) - start) for prompt_len, start, length in chunks)


def hits(engine) -> int:
    return engine.scheduler.prefix_cache.hits


def assert_same_outputs(completions, reference) -> None:
    for completion, expected in zip(completions, reference, strict=True):
        assert completion.output_ids == expected.output_ids
        assert (logits_of(completion) - logits_of(expected)).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_outputs_equal_the_cache_off_and_peft(tiny_setups, arch):
    """Siblings in one step read the blocks the first one writes; a second round reads finished ones' blocks."""
    setup = tiny_setups[arch]
    adapters = ["r8-attn", None, "r8-attn", "r16-mlp", "r8-attn"]
    prompts = [SYSTEM + prompt_of(length, 10 + i) for i, length in enumerate((5, 9, 3, 12, 17))]
    engine = make_engine(setup)
    first = run_checked(engine, prompts, adapters, logits_params())
    assert hits(engine) == 2 * 32  # the two later r8-attn requests, two blocks each, in the first step
    second = run_checked(engine, prompts, adapters, logits_params())
    # Each its own blocks now (prompt and output): two or three whole blocks, its last token left to compute.
    assert hits(engine) == 2 * 32 + (32 + 48 + 32 + 48 + 48)
    reference = make_engine(setup, enable_prefix_caching=False).generate(prompts, adapters, logits_params())
    assert_same_outputs(first, reference)
    assert_same_outputs(second, reference)
    assert_matches(PeftOracle(setup), [(a, None) for a in adapters], prompts, second, tol=PEFT_TOL)


def test_a_prefix_is_never_shared_across_adapters_or_the_base(llama, oracle):
    engine = make_engine(llama)
    prompt = prompt_of(40, 3)
    adapters = ["r8-attn", "r16-mlp", None]
    first = run_checked(engine, [prompt] * 3, adapters, logits_params())
    assert (engine.scheduler.prefix_cache.queries, hits(engine)) == (3 * 40, 0)
    second = run_checked(engine, [prompt] * 3, adapters, logits_params())
    assert hits(engine) == 3 * 32  # each its own: two whole blocks, the last token left to compute
    requests = [(adapter, None) for adapter in adapters]
    assert_matches(oracle, requests, [prompt] * 3, first, tol=PEFT_TOL)
    assert_matches(oracle, requests, [prompt] * 3, second, tol=PEFT_TOL)


def test_a_replaced_adapter_version_does_not_reuse_the_old_versions_blocks(llama, oracle):
    engine = make_engine(llama)
    prompt = prompt_of(40, 4)
    run_checked(engine, [prompt], ["r8-attn"], logits_params())
    engine.load_adapter("r8-attn", llama.adapter_dirs["r16-mlp"])  # same name, new weights, new uid
    engine.prefetch(["r8-attn"])  # read the new version now: run_checked's steps do not wait for reads
    replaced = run_checked(engine, [prompt], ["r8-attn"], logits_params())
    assert hits(engine) == 0
    assert_matches(oracle, [("r16-mlp", None)], [prompt], replaced, tol=PEFT_TOL)


def test_chunked_prefill_continues_from_cached_blocks(llama, oracle):
    engine = make_engine(llama, max_num_batched_tokens=16, max_num_seqs=4, block_size=4)
    shared = prompt_of(70, 5)
    prompt = shared + prompt_of(22, 6)
    run_checked(engine, [shared], ["r4-qv"], logits_params())
    chunks = record_chunks(engine)
    cached = run_checked(engine, [prompt], ["r4-qv"], logits_params())
    assert hits(engine) == 68  # 17 whole blocks of the shared 70 tokens
    assert chunks[:2] == [(92, 68, 16), (92, 84, 8)]
    reference = make_engine(llama, max_num_batched_tokens=16, max_num_seqs=4, block_size=4, enable_prefix_caching=False)
    assert_same_outputs(cached, reference.generate([prompt], ["r4-qv"], logits_params()))
    assert_matches(oracle, [("r4-qv", None)], [prompt], cached, tol=PEFT_TOL)


def test_preemption_under_a_tiny_kv_cache_recomputes_through_the_cache(llama, oracle):
    tiny_cache = dict(num_kv_blocks=12, block_size=8, max_num_seqs=4)
    adapters = ["r8-attn", "r8-attn", None, "r8-attn"]
    prompts = [SYSTEM[:24] + prompt_of(length, 20 + i) for i, length in enumerate((6, 9, 4, 11))]
    engine = make_engine(llama, **tiny_cache)
    completions = run_checked(engine, prompts, adapters, logits_params())
    assert engine.scheduler.num_preemptions > 0
    assert hits(engine) > 0
    reference = make_engine(llama, enable_prefix_caching=False, **tiny_cache)
    assert_same_outputs(completions, reference.generate(prompts, adapters, logits_params()))
    assert_matches(oracle, [(a, None) for a in adapters], prompts, completions, tol=PEFT_TOL)


def test_idle_cached_blocks_are_evicted_least_recently_used_first_under_pressure(llama, oracle):
    """12 blocks of 8; each request holds 6 and leaves 5 cached. The third evicts 4 of the first's, its tail first."""
    engine = make_engine(llama, num_kv_blocks=12, block_size=8)
    first, second, third = (prompt_of(33, 30 + i) for i in range(3))
    first_keys, second_keys = (extend_keys([], prompt, 8, None, DEFAULT_TENANT) for prompt in (first, second))
    cache = engine.scheduler.prefix_cache
    run_checked(engine, [first], [None], logits_params())
    run_checked(engine, [second], [None], logits_params())
    assert len(cache.lookup(first_keys)) == 4  # still there: the second request took never-cached blocks
    run_checked(engine, [third], [None], logits_params())
    assert (len(cache.lookup(first_keys)), len(cache.lookup(second_keys))) == (1, 4)
    again = run_checked(engine, [first], [None], logits_params())
    assert hits(engine) == 8
    assert_matches(oracle, [(None, None)], [first], again, tol=PEFT_TOL)


def test_prompt_logprobs_requests_score_every_prompt_token_without_a_lookup(llama):
    engine = make_engine(llama)
    prompt = prompt_of(40, 7)
    run_checked(engine, [prompt], ["r4-qv"], SamplingParams(max_tokens=2, temperature=0))
    queries = engine.scheduler.prefix_cache.queries
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    scored = run_checked(engine, [prompt], ["r4-qv"], params)[0]
    assert (engine.scheduler.prefix_cache.queries, hits(engine)) == (queries, 0)
    reference = make_engine(llama, enable_prefix_caching=False).generate([prompt], ["r4-qv"], params)[0]
    assert len(scored.prompt_logprobs) == len(reference.prompt_logprobs) == len(prompt) - 1
    for (ours, top, rank), (theirs, top_reference, rank_reference) in zip(scored.prompt_logprobs, reference.prompt_logprobs):
        assert ours == pytest.approx(theirs, abs=LOGIT_TOL)
        assert [token for token, _ in top] == [token for token, _ in top_reference]
        assert rank == rank_reference


@pytest.mark.parametrize("max_num_batched_tokens", [512, 16])
def test_n_requests_with_one_prompt_compute_its_full_blocks_once(llama, max_num_batched_tokens):
    """As the API adds an n = 4 request: four requests, one prompt, one adapter, a seed each."""
    prompt = prompt_of(37, 8)
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=1.0, seed=seed, ignore_eos=True) for seed in range(4)]
    engine = make_engine(llama, max_num_batched_tokens=max_num_batched_tokens)
    chunks = record_chunks(engine)
    together = run_checked(engine, [prompt] * 4, ["r8-attn"] * 4, params)
    assert prompt_tokens_computed(chunks) == 37 + 3 * (37 - 32)  # each sibling: its partial last block only
    reference = make_engine(llama, enable_prefix_caching=False)
    alone = [reference.generate([prompt], ["r8-attn"], request_params)[0].output_ids for request_params in params]
    assert [completion.output_ids for completion in together] == alone
    assert len({tuple(tokens) for tokens in alone}) > 1  # the seeds differ, so the comparison is not vacuous


@pytest.mark.kernels
def test_siblings_read_the_blocks_written_in_their_own_step_on_the_triton_kernels(llama, oracle):
    """The Triton attention also writes the step's K/V before it attends (interpreted here, off CUDA)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the compiled kernels are checked by test_gpu.py")
    engine = make_engine(llama, kernel_backend="triton")
    prompts = [SYSTEM + prompt_of(3, 40), SYSTEM + prompt_of(6, 41)]
    completions = run_checked(engine, prompts, ["r8-attn"] * 2, logits_params())
    assert hits(engine) == 32  # the second read the first one's two blocks in the step that wrote them
    assert_matches(oracle, [("r8-attn", None)] * 2, prompts, completions, tol=PEFT_TOL)


def test_the_fair_queue_is_charged_only_the_prompt_tokens_computed(llama):
    engine = make_engine(llama)
    prompt = prompt_of(40, 9)
    params = SamplingParams(max_tokens=1, temperature=0)
    waiting = engine.scheduler.waiting
    run_checked(engine, [prompt], [None], params)
    cold = waiting.counter(DEFAULT_TENANT)
    run_checked(engine, [prompt], [None], params)
    warm = waiting.counter(DEFAULT_TENANT) - cold
    assert warm / cold == pytest.approx((40 - 32) / 40)


def test_a_failed_requests_blocks_are_uncached(llama):
    engine = make_engine(llama)
    prompt = prompt_of(40, 10)
    engine.add_request(prompt, None, SamplingParams(max_tokens=5, temperature=0))
    engine.step()
    cache, keys = engine.scheduler.prefix_cache, extend_keys([], prompt, 16, None, DEFAULT_TENANT)
    assert len(cache.lookup(keys)) == 2
    engine.outputs.fail(engine.scheduler.running[0], "injected")
    assert cache.lookup(keys) == []
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_blocks


@pytest.mark.parametrize(("scope", "other_tenants_hits"), [("tenant", 0), ("global", 32)])
def test_a_cached_prefix_serves_other_tenants_only_with_a_global_scope(llama, scope, other_tenants_hits):
    """The base model's blocks of one tenant's prompt: its own next request hits; another tenant's only when global."""
    engine = make_engine(llama, prefix_cache_scope=scope)
    params = SamplingParams(max_tokens=2, temperature=0)
    first = run_checked(engine, [SYSTEM], [None], params, tenant="acme")
    assert hits(engine) == 0
    other = run_checked(engine, [SYSTEM], [None], params, tenant="globex")
    assert hits(engine) == other_tenants_hits
    again = run_checked(engine, [SYSTEM], [None], params, tenant="acme")
    assert hits(engine) == other_tenants_hits + 32  # two full blocks of 16: its own prefix always serves it
    assert first[0].output_ids == other[0].output_ids == again[0].output_ids


def test_with_the_cache_off_nothing_is_looked_up_or_cached(llama):
    engine = make_engine(llama, enable_prefix_caching=False)
    run_checked(engine, [SYSTEM] * 2, [None] * 2, SamplingParams(max_tokens=2, temperature=0))
    cache = engine.scheduler.prefix_cache
    assert (cache.queries, cache.hits, len(cache)) == (0, 0, 0)


@pytest.mark.parametrize("engine_process", [False, True])
def test_a_live_servers_metrics_count_prefix_cache_queries_and_hits_in_tokens(llama, tmp_path, engine_process):
    config = server_config(llama.model_dir, tmp_path, engine_process=engine_process).model_copy(update={"metrics_compat": "vllm"})
    with LiveServer(config) as server:
        body = {"model": "tiny-base", "prompt": prompt_of(40, 11), "max_tokens": 2, "temperature": 0}
        for _ in range(2):
            assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(server.url + "/metrics", timeout=60).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    vllm = (("engine", "0"), ("model_name", "tiny-base"))
    assert samples[("loraplex_prefix_cache_queries_total", ())] == samples[("vllm:prefix_cache_queries_total", vllm)] == 80
    assert samples[("loraplex_prefix_cache_hits_total", ())] == samples[("vllm:prefix_cache_hits_total", vllm)] == 32


# ----- the benchmark (loadtest/prefix_cache.py) ---------------------------------------------------


def test_the_benchmarks_trace_shares_one_system_prompt_and_draws_fresh_questions_each_round():
    config = prefix_bench.PrefixBenchConfig(system_len=32, question_len=(4, 8), requests=3)
    system = list(range(10, 42))
    first, second = prefix_bench.trace(config, system, 1), prefix_bench.trace(config, system, 2)
    assert all(spec.prompt[:32] == system and 36 <= len(spec.prompt) <= 40 for spec in first + second)
    assert [spec.prompt for spec in first] != [spec.prompt for spec in second]
    assert [spec.prompt for spec in first] == [spec.prompt for spec in prefix_bench.trace(config, system, 1)]


@pytest.mark.parametrize(
    "cached, uncached, expected",
    [((0.02, 0.04, 300.0), (0.08, 0.1, 200.0), (0.25, 0.4, 1.5)), ((None, None, None), (0.08, 0.1, 200.0), (None, None, None))],
)
def test_the_benchmark_takes_cached_over_uncached_within_a_round(cached, uncached, expected):
    runs = [prefix_bench.RunFigures(server, 1, *values, 0) for server, values in (("cached", cached), ("uncached", uncached))]
    ratios = prefix_bench.round_ratios(*runs, "cached then uncached")
    assert (ratios.ttft_p50, ratios.ttft_p90, ratios.output_tokens_per_s) == pytest.approx(expected)


def test_the_benchmark_runs_both_servers_and_reads_the_cached_ones_hit_rate():
    """A bounded run on the tiny shape: one round of four requests on each server."""
    argv = ["--model-config", "tiny", "--rounds", "1", "--requests", "4", "--concurrency", "2", "--system-len", "64",
            "--output-len", "4", "--server-threads", "1", "--max-seconds", "120"]  # fmt: skip
    ratios, hit_rate = prefix_bench.main(argv)
    assert [row.round for row in ratios] == [1]
    assert ratios[0].ttft_p50 is not None and ratios[0].output_tokens_per_s is not None
    assert hit_rate is not None and hit_rate > 0.3  # 64 of each 80 to 128 prompt tokens are the shared prefix

"""The OpenAI-compatible routes, driven by the official `openai` SDK against a live server.

Greedy outputs must be token-identical to PEFT in float32, through HTTP: every adapter alone and
all of them at once (one batch), streaming or not. Logprobs (generated and echoed prompt) must
match PEFT's / transformers' log-softmax.
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import PeftOracle
from live_server import LiveServer, server_config

PROMPTS = [[5, 17, 99, 42, 8], [120, 7, 7, 64], [33, 200, 14, 90, 91, 3, 250]]
MAX_TOKENS = 8
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}[ASSISTANT]"


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def server(llama, tmp_path_factory, request):
    """A server whose store holds every test adapter, placed on disk by the operator (shared).

    Once with the engine on a server thread, once in a process of its own, as `loraplex serve` runs it.
    """
    store = tmp_path_factory.mktemp("store")
    for name, path in llama.adapter_dirs.items():
        shutil.copytree(path, store / name)
    templated = store / "templated"
    shutil.copytree(llama.adapter_dirs["r4-qv"], templated)
    (templated / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    with LiveServer(server_config(llama.model_dir, store, engine_process=request.param, max_num_seqs=16)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(client, model: str, prompt, max_tokens: int = MAX_TOKENS, **kwargs):
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra, **kwargs
    )


def test_models_lists_the_base_and_every_adapter_with_parent(client, llama):
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {"tiny-base", "templated", *llama.adapter_dirs}
    for name in llama.adapter_dirs:
        assert models[name].model_extra["parent"] == "tiny-base"
        assert models[name].model_extra["root"]
    assert models["tiny-base"].model_extra["parent"] is None


@pytest.mark.parametrize("adapter", [None, "r4-qv", "r8-attn", "r16-mlp", "r8-all-rslora", "r4-patterns"])
def test_greedy_completion_is_token_identical_to_peft(client, oracle, tokenizer, adapter):
    for prompt in PROMPTS:
        expected, _ = oracle.generate(prompt, adapter, MAX_TOKENS)
        response = greedy(client, adapter or "tiny-base", prompt)
        assert response.usage.completion_tokens == MAX_TOKENS
        assert response.usage.prompt_tokens == len(prompt)
        assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert response.choices[0].finish_reason == "length"


def test_concurrent_requests_for_every_adapter_match_peft(client, oracle, tokenizer, llama):
    """All adapters and the base at once: the engine mixes them in shared steps."""
    jobs = [(name, prompt) for name in [None, *llama.adapter_dirs] for prompt in PROMPTS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(lambda job: greedy(client, job[0] or "tiny-base", job[1]), jobs))
    for (name, prompt), response in zip(jobs, responses, strict=True):
        expected, _ = oracle.generate(prompt, name, MAX_TOKENS)
        assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), (name, prompt)


def test_generated_logprobs_match_peft(client, oracle):
    prompt = PROMPTS[0]
    expected, logits = oracle.generate(prompt, "r8-attn", MAX_TOKENS)
    reference = logits.log_softmax(-1)  # [n, V]
    response = greedy(client, "r8-attn", prompt, logprobs=3)
    block = response.choices[0].logprobs
    assert len(block.token_logprobs) == MAX_TOKENS
    for step, (token, logprob) in enumerate(zip(expected, block.token_logprobs, strict=True)):
        assert logprob == pytest.approx(reference[step, token].item(), abs=1e-4)
        best = reference[step].topk(3).values.tolist()
        top = block.top_logprobs[step]  # token text -> logprob; tokens with the same text share a key
        assert max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(any(abs(v - b) < 1e-4 for b in best) for v in top.values())


def prompt_logprobs_reference(oracle: PeftOracle, prompt: list[int], adapter: str | None) -> list[float]:
    """Each prompt token's log-probability given the tokens before it, from PEFT's forward."""
    return oracle.prompt_logprobs(prompt, adapter)


@pytest.mark.parametrize("adapter", [None, "r16-mlp"])
def test_echo_returns_prompt_logprobs_matching_peft(client, oracle, tokenizer, adapter):
    prompt = PROMPTS[2]
    response = greedy(client, adapter or "tiny-base", prompt, max_tokens=1, echo=True, logprobs=1)
    block = response.choices[0].logprobs
    assert len(block.tokens) == len(prompt) + 1
    assert block.token_logprobs[0] is None
    expected = prompt_logprobs_reference(oracle, prompt, adapter)
    assert block.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
    assert response.choices[0].text.startswith(tokenizer.decode(prompt))


def assert_prompt_logprobs_match_peft(entries, prompt: list[int], scores, top_n: int) -> None:
    """vLLM's prompt_logprobs against PEFT's [T, V] log-softmax: each prompt token's logprob and rank, and the best alternatives."""
    assert len(entries) == len(prompt) and entries[0] is None
    for position, (token, entry) in enumerate(zip(prompt[1:], entries[1:])):
        row = scores[position]
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert own["rank"] == int((row > row[token]).sum()) + 1
        best = row.topk(top_n).indices.tolist()
        assert set(entry) == {str(t) for t in best} | {str(token)}
        assert all(entry[str(t)]["rank"] <= top_n for t in best if t != token)


@pytest.mark.parametrize("adapter", [None, "r8-attn"])
def test_prompt_logprobs_give_each_prompt_tokens_logprob_and_rank_as_peft(client, oracle, adapter):
    prompt = PROMPTS[2]
    response = greedy(client, adapter or "tiny-base", prompt, max_tokens=2, extra_body={"prompt_logprobs": 3})
    entries = response.choices[0].model_extra["prompt_logprobs"]
    assert_prompt_logprobs_match_peft(entries, prompt, oracle.prompt_scores(prompt, adapter), 3)


def test_chat_prompt_logprobs_score_the_rendered_prompt(client, server, oracle):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    response = client.chat.completions.create(
        model="r4-qv", messages=messages, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1}
    )
    rendered = server.services.engine.base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = server.services.engine.base.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt)
    assert_prompt_logprobs_match_peft(response.model_extra["prompt_logprobs"], prompt, oracle.prompt_scores(prompt, "r4-qv"), 1)


def prefix_cache_hits(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("loraplex_prefix_cache_hits_total ")))


def test_chat_prompt_logprobs_with_n_choices_score_the_prompt_once(client, server):
    """The first choice scores the shared prompt; the others start from its cached blocks."""
    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 4}]
    before = prefix_cache_hits(server)
    response = client.chat.completions.create(
        model="r4-qv", messages=messages, max_tokens=2, n=3, temperature=0, extra_body={"prompt_logprobs": 0}
    )
    assert len(response.model_extra["prompt_logprobs"]) == response.usage.prompt_tokens
    assert len(response.choices) == 3
    assert prefix_cache_hits(server) - before >= 2 * 16  # two later choices, a full block of the prompt each at least


def test_prompt_logprobs_beside_echo_logprobs_keep_each_ones_count(client):
    response = greedy(client, "tiny-base", PROMPTS[0], max_tokens=1, echo=True, logprobs=1, extra_body={"prompt_logprobs": 4})
    choice = response.choices[0]
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])  # echo: the token and one alternative
    assert all(len(entry) >= 4 for entry in choice.model_extra["prompt_logprobs"][1:])


def test_prompt_logprobs_with_stream_are_refused_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as refused:
        greedy(client, "tiny-base", PROMPTS[0], stream=True, extra_body={"prompt_logprobs": 1})
    assert refused.value.body["param"] == "prompt_logprobs"


def test_loglikelihood_request_as_lm_evaluation_harness_sends_it(client, oracle):
    """lm-eval's local-completions: token-id prompts in a batch, echo, max_tokens=1, logprobs=1,
    then sum token_logprobs[ctxlen:-1] for the continuation and check greediness on top_logprobs."""
    context, continuation = [5, 17, 99, 42], [8, 120, 7]
    batch = [context + continuation, [33, 200] + continuation]
    response = client.completions.create(
        model="r4-qv", prompt=batch, max_tokens=1, temperature=0, echo=True, logprobs=1, seed=1234
    )
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice, prompt in zip(response.choices, batch, strict=True):
        ctxlen = len(prompt) - len(continuation)
        got = sum(choice.logprobs.token_logprobs[ctxlen:-1])
        expected = sum(prompt_logprobs_reference(oracle, prompt, "r4-qv")[ctxlen - 1 :])
        assert got == pytest.approx(expected, abs=1e-4)
        for top in choice.logprobs.top_logprobs[ctxlen:-1]:
            assert isinstance(top, dict) and top


def test_echo_with_zero_max_tokens_scores_the_prompt_only(client, tokenizer):
    prompt = PROMPTS[1]
    response = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    choice = response.choices[0]
    assert choice.text == tokenizer.decode(prompt)
    assert len(choice.logprobs.tokens) == len(prompt)
    assert response.usage.completion_tokens == 0


def test_streaming_yields_the_same_text_and_usage(client):
    prompt = PROMPTS[0]
    whole = greedy(client, "r8-all-rslora", prompt, max_tokens=12)
    chunks = list(
        client.completions.create(
            model="r8-all-rslora",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_several_prompts_and_n_give_one_choice_each_in_order(client, tokenizer):
    response = client.completions.create(
        model="tiny-base", prompt=["hello", "world"], n=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == len(tokenizer("hello")["input_ids"]) + len(tokenizer("world")["input_ids"])
    assert response.usage.completion_tokens == 4 * 4
    greedy_texts = [choice.text for choice in response.choices]
    assert greedy_texts[0] == greedy_texts[1] and greedy_texts[2] == greedy_texts[3]


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model="r4-qv", prompt="once upon", max_tokens=10, temperature=1.0, seed=42, n=3)
    first = [choice.text for choice in client.completions.create(**kwargs).choices]
    second = [choice.text for choice in client.completions.create(**kwargs).choices]
    assert first == second
    assert len(set(first)) > 1, "choices of one request draw different samples"


def test_stop_string_ends_the_text_before_it(client):
    full = greedy(client, "r16-mlp", PROMPTS[1], max_tokens=24).choices[0].text
    printable = [i for i, ch in enumerate(full) if ch.isprintable() and ch != "\ufffd" and i > 2]
    assert printable, f"need a printable character in {full!r}"
    cut = printable[0]
    stop = full[cut : cut + 1]
    response = greedy(client, "r16-mlp", PROMPTS[1], max_tokens=24, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_chat_renders_messages_with_the_tokenizer_template(client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(
        model="r8-attn", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    plain = greedy(client, "r8-attn", prompt_ids, max_tokens=6)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == len(prompt_ids)


def test_chat_uses_the_adapters_own_template_when_it_has_one(client, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="templated", messages=messages, max_tokens=2, temperature=0)
    own = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False)
    assert chat.usage.prompt_tokens == len(tokenizer(own, add_special_tokens=False)["input_ids"])
    base = client.chat.completions.create(model="r4-qv", messages=messages, max_tokens=2, temperature=0)
    assert base.usage.prompt_tokens != chat.usage.prompt_tokens


def test_chat_logprobs_and_top_logprobs(client):
    chat = client.chat.completions.create(
        model="r4-patterns",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(max(alt.logprob for alt in entry.top_logprobs), abs=1e-5)
        assert entry.bytes == list(entry.token.encode())


def test_chat_streaming_matches_the_whole_response(client):
    kwargs = dict(model="r16-mlp", messages=[{"role": "user", "content": "hey"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


def test_unknown_model_is_a_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    error = caught.value.body
    assert error["code"] == "model_not_found" and "no-such-adapter" in error["message"]

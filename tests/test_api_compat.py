"""What OpenAI's and vLLM's clients reach for beyond generation, driven as they drive it, against one live server.

The server (hostile.py's keys: an admin, two tenants and a scraper; a store holding one operator-placed adapter, one
adapter uploaded by tenant acme, one served by `--lora-modules`) runs a tiny llama whose
tokenizer adds `<s>` as Llama's does, so echo can be checked for it. The official `openai` SDK
sends what it has a call for (`models.retrieve`, OpenAI's request fields, `extra_body` for vLLM's);
httpx sends vLLM's tokenizer routes as lm-evaluation-harness's remote tokenizer does.
"""

import shutil

import httpx
import openai
import pytest
from tokenizers import Tokenizer, processors

from hostile import ACME, ADMIN, BASE, GLOBEX, KEYS_FILE, auth
from live_server import LiveServer, server_config, upload
from loraplex import __version__
from loraplex.tenancy import Principal
from tiny import make_adapter, make_model

MAX_MODEL_LEN = 64
CHAT = [{"role": "user", "content": "hello world"}]
ADAPTER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"


def add_bos(model_dir) -> None:
    """Make the checkpoint's tokenizer put `<s>` in front of every text, as Llama's does."""
    path = model_dir / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    model_dir = make_model(root / "base", "llama", seed=11)
    add_bos(model_dir)
    names = ("shared-a", "acme-a", "module-a", "vllm-a")
    adapters = {name: make_adapter(model_dir, root / name, rank=4, seed=seed) for seed, name in enumerate(names)}
    return model_dir, adapters


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    model_dir, adapters = model
    store, roots = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("roots")
    shutil.copytree(adapters["shared-a"], store / "shared-a")
    (store / "shared-a" / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    shutil.copytree(adapters["vllm-a"], roots / "vllm-a")
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS_FILE)
    config = server_config(model_dir, store, api_keys=keys, max_model_len=MAX_MODEL_LEN).model_copy(
        update={"lora_modules": (f"module-a={adapters['module-a']}",), "lora_roots": (roots,)}
    )
    with LiveServer(config) as live:
        with httpx.Client(base_url=live.url, headers=auth(ACME), timeout=60) as acme:
            assert upload(acme, "acme-a", adapters["acme-a"]).status_code == 201
        yield live


def sdk(server, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return sdk(server)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=auth(ADMIN), timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.engine.base.tokenizer


def refused(response: httpx.Response, status: int, param: str | None) -> str:
    """The error's message, after checking its status and `param`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param or error["param"].startswith(f"{param}."), error
    return error["message"]


# ----- OpenAI's request fields that change nothing ------------------------------------------------

UNUSED_FIELDS = {
    "metadata": {"trace": "t-1", "team": "search"},
    "store": False,
    "service_tier": "auto",
    "user": "user-42",
    "safety_identifier": "a1b2c3",
    "prompt_cache_key": "docs-v2",
}


def test_chat_accepts_openais_fields_that_do_not_change_the_answer(client):
    plain = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=6, temperature=0)
    dressed = client.chat.completions.create(
        model=BASE, messages=CHAT, max_tokens=6, temperature=0, **UNUSED_FIELDS,
        parallel_tool_calls=False, modalities=["text"], prediction={"type": "content", "content": "hello there"},
    )  # fmt: skip
    assert dressed.choices[0].message.content == plain.choices[0].message.content


def test_completions_accept_the_same_fields(client):
    plain = client.completions.create(model=BASE, prompt="hello", max_tokens=6, temperature=0)
    dressed = client.completions.create(
        model=BASE, prompt="hello", max_tokens=6, temperature=0, user="user-42",
        extra_body={name: value for name, value in UNUSED_FIELDS.items() if name != "user"},
    )  # fmt: skip
    assert dressed.choices[0].text == plain.choices[0].text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"metadat": {"a": "b"}}, "metadat"),  # a typo is still caught
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"service_tier": "gold"}, "service_tier"),
        ({"safety_identifier": "x" * 129}, "safety_identifier"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"modalities": ["audio"]}, "modalities.0"),
        ({"parallel_tool_calls": False, "tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
        ({"prediction": {"type": "content"}}, "prediction.content"),
    ],
    ids=["typo", "17-pairs", "long-key", "long-value", "tier", "long-safety-id", "audio-too", "audio", "tool-name", "prediction"],
)
def test_chat_refuses_what_is_unknown_or_out_of_bounds_naming_it(http, fields, param):
    body = {"model": BASE, "messages": CHAT, "max_tokens": 2, **fields}
    refused(http.post("/v1/chat/completions", json=body), 400, param)


# ----- GET /v1/models/{id} --------------------------------------------------------------------------


def test_retrieve_gives_the_card_the_list_gives(client):
    listed = {model.id: model for model in client.models.list()}
    assert set(listed) == {BASE, "shared-a", "acme-a", "module-a"}
    for model_id, card in listed.items():
        assert client.models.retrieve(model_id) == card


@pytest.mark.parametrize(("key", "visible"), [(ACME, {BASE, "shared-a", "acme-a", "module-a"}), (GLOBEX, {BASE, "shared-a", "module-a"})])
def test_a_tenant_retrieves_only_what_it_may_use(server, key, visible):
    client = sdk(server, key)
    for model_id in (BASE, "shared-a", "acme-a", "module-a", "missing"):
        if model_id in visible:
            assert client.models.retrieve(model_id).id == model_id
        else:
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve(model_id)
    assert client.models.retrieve("module-a").model_extra["parent"] == BASE


# ----- vLLM's tokenizer routes --------------------------------------------------------------------


def test_tokenize_gives_the_ids_a_completion_runs(http, client, tokenizer):
    answer = http.post("/tokenize", json={"model": BASE, "prompt": "hello world"}).json()
    assert answer == {"count": len(answer["tokens"]), "max_model_len": MAX_MODEL_LEN, "tokens": tokenizer("hello world")["input_ids"]}
    assert answer["tokens"][0] == tokenizer.bos_token_id
    completion = client.completions.create(model="acme-a", prompt="hello world", max_tokens=1)
    assert completion.usage.prompt_tokens == answer["count"]


def test_tokenize_the_chat_form_gives_the_ids_chat_completions_run(http, client):
    """Through the adapter's own chat template when it has one, as chat completions render it."""
    counts = {}
    for model in (BASE, "shared-a"):
        counts[model] = http.post("/tokenize", json={"model": model, "messages": CHAT}).json()["count"]
        chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1)
        assert counts[model] == chat.usage.prompt_tokens
    assert counts[BASE] != counts["shared-a"]
    without_cue = http.post("/tokenize", json={"model": "shared-a", "messages": CHAT, "add_generation_prompt": False})
    assert without_cue.json()["count"] < counts["shared-a"]


def test_tokenize_returns_token_strings_and_leaves_special_tokens_out_on_request(http, tokenizer):
    answer = http.post("/tokenize", json={"prompt": "hello", "return_token_strs": True, "add_special_tokens": False}).json()
    assert answer["tokens"] == tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])


def test_detokenize_gives_the_text_back(http, tokenizer):
    ids = tokenizer("hello world")["input_ids"]
    assert http.post("/detokenize", json={"model": BASE, "tokens": ids}).json() == {"prompt": "<s>hello world"}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_lm_eval_remote_tokenizer_finds_what_it_reads(server, tokenizer):
    """lm-eval's RemoteTokenizer: the base URL without /v1/completions, the key as a bearer token, no model."""
    base = (server.url + "/v1/completions").replace("/v1/completions", "")
    with httpx.Client(base_url=base, headers=auth(GLOBEX), timeout=60) as remote:
        info = remote.get("/tokenizer_info").json()
        assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
        assert info["chat_template"] == tokenizer.chat_template
        assert info["model_max_length"] == MAX_MODEL_LEN

        def encode(text: str) -> list[int]:
            return remote.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

        assert encode(info["eos_token"])[0] == tokenizer.eos_token_id
        assert encode("the quick brown fox") == tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
        ids = encode("the lazy dog")
        assert remote.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "the lazy dog"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "fox " * MAX_MODEL_LEN}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "prompt"),
        ("/tokenize", {"add_special_tokens": True}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "acme-a"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "tokens": [1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1] * (MAX_MODEL_LEN + 1)}, 400, "tokens"),
        ("/detokenize", {"tokens": [100_000]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "acme-a"}, 404, "model"),
    ],
    ids=["too-long", "both-forms", "neither", "others-adapter", "unknown-field", "too-many-ids", "id-past-vocab", "others-adapter-ids"],
)
def test_the_tokenizer_routes_refuse_naming_the_field(server, path, body, status, param):
    with httpx.Client(base_url=server.url, headers=auth(GLOBEX), timeout=60) as globex:
        refused(globex.post(path, json=body), status, param)


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/tokenizer_info"])
def test_the_tokenizer_routes_need_a_key_as_v1_routes_do(server, path):
    method = "GET" if path == "/tokenizer_info" else "POST"
    for headers in ({}, auth("sk-not-a-key-at-all")):
        response = httpx.request(method, server.url + path, json={"prompt": "x", "tokens": []}, headers=headers)
        assert response.status_code == 401, response.text


def test_version_is_open_and_says_loraplexs(server):
    assert httpx.get(server.url + "/version").json() == {"version": __version__}


# ----- streaming usage, echo -----------------------------------------------------------------------

CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client):
    chunks = list(
        client.completions.create(
            model="shared-a", prompt="hello", max_tokens=5, temperature=0, stream=True, stream_options=CONTINUOUS,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert all(chunk.usage is not None for chunk in chunks)
    generated = [chunk.usage.completion_tokens for chunk in chunks if chunk.choices]
    assert generated == sorted(set(generated)) and generated[-1] == 5  # a token of no text alone sends no chunk
    final = chunks[-1]
    assert not final.choices and (final.usage.prompt_tokens, final.usage.completion_tokens) == (chunks[0].usage.prompt_tokens, 5)


def test_continuous_usage_stats_on_chat_start_from_the_prompt(client):
    chunks = list(
        client.chat.completions.create(
            model=BASE, messages=CHAT, max_tokens=4, temperature=0, stream=True, stream_options=CONTINUOUS,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    usages = [(chunk.usage.prompt_tokens, chunk.usage.completion_tokens) for chunk in chunks]
    prompt = usages[0][0]
    assert chunks[0].choices[0].delta.role == "assistant" and usages[0] == (prompt, 0)
    assert usages[-1] == (prompt, 4) and [done for _, done in usages] == sorted(done for _, done in usages)


def test_without_continuous_usage_stats_only_the_last_chunk_carries_usage(client):
    stream = client.completions.create(
        model=BASE, prompt="hello", max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert [chunk.usage is not None for chunk in chunks] == [False] * (len(chunks) - 1) + [True]


def test_continuous_usage_stats_needs_include_usage(http):
    body = {"model": BASE, "prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert "include_usage" in refused(http.post("/v1/completions", json=body), 400, "stream_options.continuous_usage_stats")


def test_echo_returns_a_text_prompt_as_sent(client, tokenizer):
    response = client.completions.create(model=BASE, prompt="hello world", max_tokens=2, echo=True, logprobs=0, temperature=0)
    choice = response.choices[0]
    assert choice.text.startswith("hello world") and not choice.text.startswith("<s>")
    assert choice.logprobs.tokens[0] == "<s>"  # the scored prompt is what ran, BOS included
    assert len(choice.logprobs.tokens) == len(tokenizer("hello world")["input_ids"]) + 2


def test_echo_returns_each_prompt_of_a_batch_as_sent_streaming_too(client, tokenizer):
    ids = tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    batch = client.completions.create(model=BASE, prompt=["hello", "quick fox"], max_tokens=0, echo=True, n=2)
    assert [choice.text for choice in batch.choices] == ["hello", "hello", "quick fox", "quick fox"]
    assert client.completions.create(model=BASE, prompt=ids, max_tokens=0, echo=True).choices[0].text == "the lazy dog"
    stream = client.completions.create(model=BASE, prompt="hello", max_tokens=2, echo=True, stream=True)
    assert next(iter(stream)).choices[0].text.startswith("hello")



def _pieces_at_offsets(text: str, logprobs) -> list[str]:
    """The text each token's text_offset points at, as long as the token's own text."""
    return [text[offset : offset + len(token)] for token, offset in zip(logprobs.tokens, logprobs.text_offset)]


def test_echo_text_offsets_index_the_returned_text(client):
    prompt = "hello world, the quick fox"
    choice = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, echo=True, logprobs=1, temperature=0).choices[0]
    offsets, tokens = choice.logprobs.text_offset, choice.logprobs.tokens
    assert offsets[0] == 0 and tokens[0] == "<s>"  # the BOS the tokenizer added stands before the text
    prompt_tokens = len(tokens) - len(choice.logprobs.token_logprobs[-4:])
    assert _pieces_at_offsets(choice.text, choice.logprobs)[1:prompt_tokens] == tokens[1:prompt_tokens]
    assert offsets == sorted(offsets) and offsets[prompt_tokens] == len(prompt)  # generated tokens follow the prompt


def test_streamed_text_offsets_index_the_whole_text(client):
    prompt = "the lazy dog"
    stream = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=6, echo=True, logprobs=0, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    text, tokens, offsets = "", [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
        if chunk.choices:
            text += chunk.choices[0].text
    whole = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=6, echo=True, logprobs=0, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0]
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset


def test_a_response_message_sent_back_whole_is_accepted(client):
    """`message.model_dump()` carries refusal, annotations, audio and function_call as null: the next turn takes it."""
    asked = [{"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model=BASE, messages=asked, max_tokens=2, temperature=0)
    sent_back = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= set(sent_back)
    history = [*asked, sent_back, {"role": "user", "content": "ok"}]
    again = client.chat.completions.create(model=BASE, messages=history, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens


def test_an_assistant_refusal_is_rendered_as_its_words(client):
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I refuse"}]
    refused_ = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "refusal": "I refuse"}]
    tokens = [client.chat.completions.create(model=BASE, messages=m, max_tokens=1).usage.prompt_tokens for m in (said, refused_)]
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("field", ["audio", "function_call"])
def test_an_assistant_message_with_audio_or_a_legacy_function_call_is_refused_naming_it(http, field):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", field: {"id": "a"}}]
    refused(http.post("/v1/chat/completions", json={"model": BASE, "messages": messages}), 400, f"messages.1.{field}")

# ----- vLLM's adapter management ------------------------------------------------------------------


def test_load_lora_adapter_takes_lora_int_id_and_answers_a_second_load_with_400(http, server):
    body = {"lora_name": "vllm-a", "lora_path": str(server.config.lora_roots[0] / "vllm-a"), "lora_int_id": 7}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert "vllm-a" in refused(http.post("/v1/load_lora_adapter", json=body), 400, "lora_name")
    body = {**body, "lora_name": "shared-a"}  # a store adapter's name is as taken
    refused(http.post("/v1/load_lora_adapter", json=body), 400, "lora_name")


def test_a_lora_modules_adapter_is_shared_with_every_tenant(server):
    record = server.services.catalog.get("module-a", Principal("operators", "admin"))
    assert record.owner is None and record.source == "path"
    completion = sdk(server, GLOBEX).completions.create(model="module-a", prompt="hello", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens >= 1

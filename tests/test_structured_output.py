"""Structured outputs through the OpenAI-compatible API, driven by the official `openai` SDK.

A live server on 127.0.0.1, its engine in a process of its own as `loraplex serve` runs it:
`response_format` (json_object, json_schema) on chat, vLLM's `structured_outputs` (json, regex,
choice, grammar) on chat and completions, sync, async and streamed. Every constrained output is
checked against what was asked (`jsonschema` for schemas, `re.fullmatch` for regexes). Outputs
are greedy, so each test's result is deterministic. A schema keyword, regex or grammar the
library cannot enforce is a 400 naming the field.
"""

import asyncio
import json
import re
import shutil

import jsonschema
import llguidance
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from live_server import LiveServer, server_config
from loraplex.api.structured_output import grammar_for_schema, lark_json, tokenizer_of

MAX_TOKENS = 160
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Give me a person as JSON."}]
PLAIN_TEXT = "the quick brown fox jumps over the lazy dog " * 4

# The JSON Schema keywords apps use: each one enforced (schemas small enough to complete).
KEYWORD_SCHEMAS = {
    "type": {"type": "boolean"},
    "required": {
        "type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"], "additionalProperties": False,
    },
    "enum": {"enum": ["red", "green", 3]},
    "const": {"const": "fixed"},
    "minimum/maximum": {"type": "integer", "minimum": 10, "maximum": 20},
    "minLength/maxLength": {"type": "string", "minLength": 3, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[a-c]{2}-[0-9]{2}$"},
    "additionalProperties": {
        "type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"], "additionalProperties": False,
    },
    "minItems/maxItems": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "nested objects": {
        "type": "object",
        "properties": {"o": {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"], "additionalProperties": False}},
        "required": ["o"],
        "additionalProperties": False,
    },
    "$ref/$defs": {
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/small"}},
        "required": ["p"],
        "additionalProperties": False,
        "$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 5}},
    },
}  # fmt: skip
# An instance each keyword's schema must refuse: checked against the grammar itself, token by token.
KEYWORD_VIOLATIONS = {
    "type": "1",
    "required": "{}",
    "enum": '"blue"',
    "const": '"other"',
    "minimum/maximum": "21",
    "minLength/maxLength": '"ab"',
    "pattern": '"ab-1x"',
    "additionalProperties": '{"k": true, "x": 1}',
    "minItems/maxItems": "[true]",
    "nested objects": '{"o": {"b": 1}}',
    "$ref/$defs": '{"p": 6}',
}


def train_plain_text_adapter(model_dir, path) -> None:
    """A LoRA adapter trained (a few Adam steps) to continue any prompt with plain English, never JSON."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    ids = torch.tensor([tokenizer(PLAIN_TEXT)["input_ids"]])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    torch.manual_seed(0)
    for _ in range(120):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    for name in ("r4-qv", "r8-attn"):
        shutil.copytree(llama.adapter_dirs[name], store / name)
    train_plain_text_adapter(llama.model_dir, store / "plain-text")
    config = server_config(llama.model_dir, store, engine_process=True, max_num_seqs=16, max_model_len=512)
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model="tiny-base", stream=False, **fields) -> tuple[str, str]:
    """(content, finish_reason) of one greedy chat completion, streamed or not."""
    fields = {"max_tokens": MAX_TOKENS, **fields}
    out = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, stream=stream, **fields)
    if not stream:
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = [c for c in out if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def complete(client, model="tiny-base", stream=False, prompt="name: Ada, city:", **fields) -> tuple[str, str]:
    """(text, finish_reason) of one greedy completion, streamed or not."""
    fields = {"max_tokens": MAX_TOKENS, **fields}
    out = client.completions.create(model=model, prompt=prompt, temperature=0, stream=stream, **fields)
    if not stream:
        return out.choices[0].text, out.choices[0].finish_reason
    chunks = [c for c in out if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def assert_valid(text: str, finish: str, schema: dict) -> None:
    assert finish == "stop", f"the output did not complete: {text!r}"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize("model", ["tiny-base", "r4-qv"])
def test_chat_response_format_json_schema(client, model, stream):
    assert_valid(*chat(client, model, stream, response_format=json_schema_format(PERSON)), PERSON)


def test_chat_response_format_json_schema_async(async_client):
    async def run():
        out = await async_client.chat.completions.create(
            model="r8-attn", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, response_format=json_schema_format(PERSON)
        )
        return out.choices[0].message.content, out.choices[0].finish_reason

    assert_valid(*asyncio.run(run()), PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
def test_chat_response_format_json_object(client, stream):
    text, finish = chat(client, "r4-qv", stream, response_format={"type": "json_object"}, max_tokens=400)
    assert finish == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
def test_completions_take_response_format_as_vllm_does(client, stream):
    text, finish = complete(client, "r8-attn", stream, extra_body={"response_format": json_schema_format(PERSON)})
    assert_valid(text, finish, PERSON)


def test_response_format_text_leaves_the_output_free(client):
    free = chat(client, "r4-qv", max_tokens=12)
    assert chat(client, "r4-qv", response_format={"type": "text"}, max_tokens=12) == free


ROUTES = {"chat": chat, "completions": complete}


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize("route", ROUTES)
def test_structured_outputs_json(client, route, stream):
    text, finish = ROUTES[route](client, "r8-attn", stream, extra_body={"structured_outputs": {"json": PERSON}})
    assert_valid(text, finish, PERSON)


@pytest.mark.parametrize("route", ROUTES)
def test_structured_outputs_json_as_text(client, route):
    text, finish = ROUTES[route](client, extra_body={"structured_outputs": {"json": json.dumps(PERSON)}})
    assert_valid(text, finish, PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize("route", ROUTES)
def test_structured_outputs_regex(client, route, stream):
    pattern = r"[A-Z][a-z]{2,6} [0-9]{3}-[0-9]{4}"
    text, finish = ROUTES[route](client, "r4-qv", stream, extra_body={"structured_outputs": {"regex": pattern}})
    assert finish == "stop" and re.fullmatch(pattern, text)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize("route", ROUTES)
def test_structured_outputs_choice(client, route, stream):
    choices = ["positive", "negative", 'a "quoted" one', "back\\slash"]
    text, finish = ROUTES[route](client, "tiny-base", stream, extra_body={"structured_outputs": {"choice": choices}})
    assert finish == "stop" and text in choices


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize("route", ROUTES)
def test_structured_outputs_grammar(client, route, stream):
    grammar = 'start: "SELECT " column ("," column)* " FROM " table\ncolumn: /[a-z]{1,5}/\ntable: "users" | "orders"'
    text, finish = ROUTES[route](client, "r8-attn", stream, extra_body={"structured_outputs": {"grammar": grammar}})
    assert finish == "stop" and re.fullmatch(r"SELECT [a-z]{1,5}(,[a-z]{1,5})* FROM (users|orders)", text)


def test_lark_grammar_embedding_a_json_schema(client):
    """Tool calls build on this: a Lark rule whose body is `%json {schema}`."""
    grammar = 'start: "<call>" args "</call>"\nargs: ' + lark_json(PERSON)
    text, finish = complete(client, extra_body={"structured_outputs": {"grammar": grammar}})
    assert finish == "stop" and text.startswith("<call>") and text.endswith("</call>")
    jsonschema.validate(json.loads(text.removeprefix("<call>").removesuffix("</call>")), PERSON)


def test_constrained_and_unconstrained_requests_share_batches(client):
    """Constrained (three adapters and the base) and unconstrained requests at once, all answered right."""

    async def run():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=120)
        asks = []
        for i, model in enumerate(["tiny-base", "r4-qv", "r8-attn", "plain-text"] * 2):
            extra = {"structured_outputs": {"json": PERSON}} if i % 2 == 0 else {"ignore_eos": True}
            asks.append(
                aclient.completions.create(
                    model=model, prompt=f"person {i}:", max_tokens=MAX_TOKENS if i % 2 == 0 else 20, temperature=0, extra_body=extra
                )
            )
        return await asyncio.gather(*asks)

    outs = asyncio.run(run())
    for i, out in enumerate(outs):
        if i % 2 == 0:
            assert_valid(out.choices[0].text, out.choices[0].finish_reason, PERSON)
        else:
            assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 20


def test_an_adapter_trained_on_plain_text_still_gives_valid_json(client):
    free, _ = complete(client, "plain-text", prompt="the quick", max_tokens=24)
    assert free.startswith(" brown fox jumps"), "the adapter did not learn its plain text"
    asked = {"structured_outputs": {"json": PERSON}}
    assert_valid(*complete(client, "plain-text", prompt="the quick", extra_body=asked), PERSON)
    assert_valid(*chat(client, "plain-text", response_format=json_schema_format(PERSON)), PERSON)


@pytest.mark.parametrize("keyword", KEYWORD_SCHEMAS)
def test_each_listed_keyword_is_enforced_on_the_output(client, keyword):
    schema = KEYWORD_SCHEMAS[keyword]
    for model in ("tiny-base", "r4-qv"):
        assert_valid(*complete(client, model, extra_body={"structured_outputs": {"json": schema}}), schema)


@pytest.mark.parametrize("keyword", KEYWORD_SCHEMAS)
def test_each_listed_keyword_refuses_a_violating_instance(llama, keyword):
    """The grammar itself refuses, token by token, an instance that breaks the keyword (and takes a valid one)."""
    tokenizer = tokenizer_of(AutoTokenizer.from_pretrained(llama.model_dir))
    grammar = grammar_for_schema(KEYWORD_SCHEMAS[keyword], "schema", tokenizer)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    assert not (matcher.consume_tokens(tokenizer.tokenize_str(KEYWORD_VIOLATIONS[keyword])) and matcher.is_accepting())
    assert KEYWORD_VIOLATIONS.keys() == KEYWORD_SCHEMAS.keys()


def error_of(caught) -> dict:
    return caught.value.response.json()["error"]


@pytest.mark.parametrize(
    "schema, named",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "string", "pattern": "(unclosed"}, "unclosed"),
        ({"$ref": "#/$defs/missing"}, "missing"),
    ],
)
def test_a_schema_the_library_cannot_enforce_is_a_400_naming_it(client, schema, named):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, response_format=json_schema_format(schema))
    error = error_of(caught)
    assert error["param"] == "response_format.json_schema.schema" and named in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, extra_body={"structured_outputs": {"json": schema}})
    assert error_of(caught)["param"] == "structured_outputs.json" and named in error_of(caught)["message"]


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("regex", "(unclosed", "unclosed group"),
        ("regex", "(?=lookahead)", "look-around"),
        ("grammar", "start: undefined_rule", "undefined_rule"),
        ("grammar", 'start: "a" <|no-such-token|>', "no-such-token"),
        ("json", "{not json", "JSON"),
    ],
)
def test_a_bad_regex_or_grammar_is_a_400_naming_it(client, field, value, named):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, extra_body={"structured_outputs": {field: value}})
    assert error_of(caught)["param"] == f"structured_outputs.{field}" and named in error_of(caught)["message"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {}}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"extra_body": {"structured_outputs": {"regex": "a" * 5000}}}, "structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs.choice"),
        ({"extra_body": {"structured_outputs": {"json": "x" * (64 * 1024 + 1)}}}, "structured_outputs.json"),
    ],
)
def test_a_malformed_structured_output_request_is_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, **fields)
    assert error_of(caught)["param"] == param

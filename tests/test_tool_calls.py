"""Tool calls: the parsers read each format whole and streamed in any chunking alike, the grammars
admit exactly calls in their format, templates see tools and past calls as transformers shows them,
and the chat route returns `message.tool_calls` / streamed `delta.tool_calls` through the openai SDK
(sync, async, streaming) with `tool_choice` required or named constraining the output, so even a
random tiny model makes a call whose arguments parse and match the schema.
"""

import asyncio
import itertools
import json
import random
import shutil

import httpx
import jsonschema
import llguidance
import llguidance.hf
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from live_server import LiveServer, server_config
from loraplex.api.chat_template import ChatTemplateRenderer
from loraplex.api.tool_calls import PARSERS, ToolCallStream, parse_tool_calls, parser_for_template
from loraplex.api.tool_grammar import call_grammar, special_tags
from tiny import VOCAB_SIZE

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "London"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def calls_of(parsed) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in parsed.calls]


# ----- whole texts ---------------------------------------------------------------------------------

CASES = [
    # (parser, text, content, [(name, arguments)])
    ("hermes", "The answer is 4.", "The answer is 4.", []),
    ("hermes", "  spaced  ", "  spaced  ", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", '{"city": "Paris"}')]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, "}"]}}\n</tool_call>', "Let me look.",
     [("f", '{"a": [1, "}"]}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {"x": 1}}</tool_call>',
     None, [("f", "{}"), ("g", '{"x": 1}')]),
    ("hermes", 'a <tool_call>{"name": "f", "arguments": {}}</tool_call> b', "a b", [("f", "{}")]),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "late"}</tool_call>', None, [("late", '{"x": 1}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"q": "a\\"b</tool_call>"}}</tool_call>', None,
     [("f", '{"q": "a\\"b</tool_call>"}')]),
    ("hermes", '<tool_call>{"name": oops}</tool_call> after', '<tool_call>{"name": oops}</tool_call> after', []),
    ("hermes", '<tool_call>not json</tool_call>', "<tool_call>not json</tool_call>", []),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>', None, [("f", '{"a": 1}')]),
    ("hermes", "ends in a partial tag <tool_ca", "ends in a partial tag <tool_ca", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\n', None, [("f", "{}")]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool', "\n<tool", [("f", "{}")]),
    ("hermes", "a <<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", "a <", [("f", "{}")]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a"', None, [("f", '{"a"')]),  # cut off: as far as it got
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a": 1}')]),
    ("llama3_json", '\n{"name": "f", "parameters": {"a": "x;y"}}; {"name": "g", "parameters": {}}', None,
     [("f", '{"a": "x;y"}'), ("g", "{}")]),
    ("llama3_json", '{"parameters": {"b": 2}, "name": "late"}', None, [("late", '{"b": 2}')]),
    ("llama3_json", ' {"a": 1}', ' {"a": 1}', []),
    ("llama3_json", '{"name": "f", "parameters": {}} and then text', " and then text", [("f", "{}")]),
    ("llama3_json", '{"name": "f", "parameters": {}}; oops', "; oops", [("f", "{}")]),
    ("llama3_json", '{"name": "f", "parameters": {}};  ', None, [("f", "{}")]),
    ("mistral", "The answer is 4.", "The answer is 4.", []),
    ("mistral", "[1, 2] and [TOOL_C", "[1, 2] and [TOOL_C", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
     [("get_weather", '{"city": "Paris"}')]),
    ("mistral", 'Let me look. [TOOL_CALLS] [ {"name": "f", "arguments": {"a": "]}"}} ,{"name": "g", "arguments": {}}]\n',
     "Let me look.", [("f", '{"a": "]}"}'), ("g", "{}")]),
    ("mistral", '[TOOL_CALLS][{"arguments": {"x": 1}, "name": "late"}]', None, [("late", '{"x": 1}')]),
    ("mistral", '[[TOOL_CALLS][{"name": "f", "arguments": {}}] then text', "[ then text", [("f", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}][TOOL_CALLS][{"name": "g", "arguments": {}}]', None,
     [("f", "{}"), ("g", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}], oops', ", oops", [("f", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, oops]', ", oops]", [("f", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}},', None, [("f", "{}")]),
    ("mistral", "[TOOL_CALLS]not json", "[TOOL_CALLS]not json", []),
    ("mistral", '[TOOL_CALLS] {"name": "f", "arguments": {}}', '[TOOL_CALLS] {"name": "f", "arguments": {}}', []),
    ("mistral", '[TOOL_CALLS][{"name": oops}] after', '[TOOL_CALLS][{"name": oops}] after', []),
    ("mistral", '[TOOL_CALLS][{"name": "f"}]', '[TOOL_CALLS][{"name": "f"}]', []),
    ("mistral", "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("mistral", "[TOOL_CALLS] [ ", "[TOOL_CALLS] [ ", []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a"', None, [("f", '{"a"')]),  # cut off: as far as it got
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_a_whole_text_gives_its_content_and_calls(parser, text, content, calls):
    parsed = parse_tool_calls(parser, text, ids())
    assert calls_of(parsed) == calls
    assert parsed.content == content


def test_parallel_tool_calls_false_keeps_the_first_call_only():
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert calls_of(parse_tool_calls("hermes", text, ids(), max_calls=1)) == [("f", "{}")]


def test_each_call_gets_its_own_id():
    text = '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}'
    parsed = parse_tool_calls("llama3_json", text, ids())
    assert [call.id for call in parsed.calls] == ["call_0", "call_1"]


def test_parallel_tool_calls_false_keeps_the_first_of_a_mistral_array():
    text = '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]'
    parsed = parse_tool_calls("mistral", text, ids(), max_calls=1)
    assert calls_of(parsed) == [("f", "{}")] and parsed.content is None


# ----- streaming -----------------------------------------------------------------------------------


def streamed(parser: str, pieces: list[str]) -> tuple[str, list[dict]]:
    """The content and per-call deltas a stream gives for `pieces`, joined as a client joins them."""
    stream = ToolCallStream(parser, ids())
    content, calls = "", {}
    for delta in [*(stream.feed(piece) for piece in pieces), stream.finish()]:
        content += delta.content
        for entry in delta.tool_calls:
            if "id" in entry:
                assert entry["index"] not in calls and entry["type"] == "function"
                calls[entry["index"]] = {"id": entry["id"], "name": entry["function"]["name"], "arguments": ""}
            calls[entry["index"]]["arguments"] += entry["function"].get("arguments", "")
    return content, [calls[i] for i in range(len(calls))]


def chunkings(text: str, count: int = 12):
    yield [text]
    yield list(text)
    for seed in range(count):
        rng, cuts = random.Random(seed), []
        position = 0
        while position < len(text):
            step = rng.randint(1, 7)
            cuts.append(text[position : position + step])
            position += step
        yield cuts


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_any_chunking_streams_the_calls_and_content_of_the_whole_text(parser, text, content, calls):
    whole = parse_tool_calls(parser, text, ids())
    for pieces in chunkings(text):
        got_content, got_calls = streamed(parser, pieces)
        assert got_content == (whole.content or "")
        assert [(c["name"], c["arguments"]) for c in got_calls] == calls_of(whole)


def test_a_call_streams_its_name_first_then_argument_fragments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    stream = ToolCallStream("hermes", ids())
    deltas = [stream.feed(ch) for ch in text] + [stream.finish()]
    entries = [entry for delta in deltas for entry in delta.tool_calls]
    first, rest = entries[0], entries[1:]
    assert first == {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}
    assert len(rest) > 5 and all(set(entry) == {"index", "function"} and entry["index"] == 0 for entry in rest)
    assert "".join(entry["function"]["arguments"] for entry in entries) == '{"city": "Paris", "days": 3}'
    assert all(not delta.content for delta in deltas)


def test_content_before_a_call_streams_before_the_tag_is_complete():
    stream = ToolCallStream("hermes", ids())
    assert stream.feed("Checking the weather").content == "Checking the weather"
    assert stream.feed(" <tool_").content == ""  # a tag may be starting: held back
    assert stream.feed("box>").content == " <tool_box>"


def test_mistral_content_before_the_calls_streams_before_the_tag_is_complete():
    stream = ToolCallStream("mistral", ids())
    assert stream.feed("See [1]").content == "See [1]"
    assert stream.feed(" [TOOL_").content == ""  # a tag may be starting: held back
    assert stream.feed("CALLS][").content == ""
    delta = stream.feed('{"name": "f", "arguments": {"a": 1}}')
    assert delta.content == "" and delta.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


# ----- choosing a parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "configured", "expected"),
    [
        ("{% for t in tools %}<tool_call>{% endfor %}", "auto", "hermes"),
        ("{{ '<|python_tag|>' }}{% if m.role == 'ipython' %}{% endif %}", "auto", "llama3_json"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "auto", "hermes"),
        ("{{ '<|python_tag|>' }}", "hermes", "hermes"),
        ("<tool_call>", "llama3_json", "llama3_json"),
        ("{{ '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}", "auto", "mistral"),
        ("{% if m.tool_calls %}[TOOL_CALLS]{% endif %}{% if m.role == 'ipython' %}{% endif %}", "auto", "mistral"),
        ("[TOOL_CALLS]", "hermes", "hermes"),
    ],
)
def test_the_parser_is_the_configured_one_or_the_templates(template, configured, expected):
    assert parser_for_template(template, configured) == expected


# ----- grammars ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammar_tokenizer(tokenizer):
    return llguidance.hf.from_tokenizer(tokenizer)


def accepts(grammar_tokenizer, tokenizer, lark: str, text: str) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert not llguidance.LLMatcher.validate_grammar_with_warnings(grammar, grammar_tokenizer)[0]
    matcher = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


GRAMMAR_CASES = [
    # (parser, parallel, text, accepted)
    ("hermes", False, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>', True),
    ("hermes", False, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', True),
    ("hermes", False, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>', False),
    ("hermes", False, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', False),
    ("hermes", False, '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>', False),
    ("hermes", False, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "ping", "arguments": {}}\n</tool_call>', False),
    ("hermes", True, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "London", "days": 7}}\n</tool_call>', True),
    ("hermes", False, 'Sure. <tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', False),
    ("llama3_json", False, '{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}', True),
    ("llama3_json", False, '{"name": "ping", "parameters": {"extra": 1}}', False),
    ("llama3_json", True, '{"name": "ping", "parameters": {}}; {"name": "ping", "parameters": {}}', True),
    ("llama3_json", False, '{"name": "ping", "parameters": {}}; {"name": "ping", "parameters": {}}', False),
    ("mistral", False, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', True),
    ("mistral", False, '[TOOL_CALLS][{"name": "ping", "arguments": {}}]', True),
    ("mistral", False, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}]', False),
    ("mistral", False, '[TOOL_CALLS]{"name": "ping", "arguments": {}}', False),
    ("mistral", False, '[{"name": "ping", "arguments": {}}]', False),
    ("mistral", False, '[TOOL_CALLS][{"name": "ping", "arguments": {}}, {"name": "ping", "arguments": {}}]', False),
    ("mistral", True, '[TOOL_CALLS][{"name": "ping", "arguments": {}}, '
     '{"name": "get_weather", "arguments": {"city": "London", "days": 7}}]', True),
    ("mistral", True, '[TOOL_CALLS][{"name": "ping", "arguments": {}}][TOOL_CALLS][{"name": "ping", "arguments": {}}]', False),
]


@pytest.mark.parametrize(("parser", "parallel", "text", "accepted"), GRAMMAR_CASES)
def test_the_call_grammar_admits_exactly_calls_in_its_format(grammar_tokenizer, tokenizer, parser, parallel, text, accepted):
    functions = [("get_weather", WEATHER), ("ping", {"type": "object", "properties": {}, "additionalProperties": False})]
    assert accepts(grammar_tokenizer, tokenizer, call_grammar(parser, functions, parallel), text) == accepted


@pytest.mark.parametrize("parser", PARSERS)
def test_what_the_grammar_admits_parses_into_calls_matching_the_schema(parser):
    text = {
        "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London", "days": 2}}\n</tool_call>',
        "llama3_json": '{"name": "get_weather", "parameters": {"city": "London", "days": 2}}',
        "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "London", "days": 2}}]',
    }[parser]
    (call,) = parse_tool_calls(parser, text, ids()).calls
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def tokenizer_with_special(tag: str):
    """A byte-level BPE tokenizer like the tiny models', with `tag` as a special token of its own (as Mistral's has)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<pad>", tag],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(['{"name": "ping", "arguments": {}}'] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", additional_special_tokens=[tag])


@pytest.mark.parametrize(("parser", "tag"), [("mistral", "[TOOL_CALLS]"), ("hermes", "<tool_call>")])
def test_a_forced_call_opens_with_the_tokenizers_own_special_token_for_its_tag(parser, tag):
    """Where the tag is one special token, the forced output begins with that token, which the matcher then takes
    (named as a string, llguidance offered the token and refused it once sampled: the request failed)."""
    tokenizer = tokenizer_with_special(tag)
    special = tokenizer.convert_tokens_to_ids(tag)
    assert special_tags(tokenizer) == {tag: special}
    lark = call_grammar(parser, [("ping", {"type": "object", "properties": {}})], False, special_tags(tokenizer))
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar, log_level=0)
    allowed = [token for token, bias in enumerate(matcher.compute_logit_bias()) if bias]
    assert allowed == [special]
    assert matcher.consume_token(special)
    rest = '[{"name": "ping", "arguments": {}}]' if parser == "mistral" else '\n{"name": "ping", "arguments": {}}\n</tool_call>'
    # the rest as plain text (hermes's closing tag is not a special token of this tokenizer)
    assert matcher.consume_tokens(tokenizer.encode(rest, add_special_tokens=False)) and matcher.is_accepting()
    text = tokenizer.decode([special] + tokenizer.encode(rest, add_special_tokens=False), skip_special_tokens=False)
    (call,) = parse_tool_calls(parser, text, ids()).calls
    assert call.name == "ping"


# ----- templates see the tools and the calls -------------------------------------------------------

TOOL_TEMPLATE = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}{% endif %}'
    "{%- if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}\n{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": WEATHER}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}},
    ]},
    {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1"},
]  # fmt: skip


def test_a_template_renders_tools_and_past_calls_as_transformers_does(tokenizer):
    expected = tokenizer.apply_chat_template(
        HISTORY, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    renderer = ChatTemplateRenderer(timeout=10.0, workers=1)
    try:
        rendered = renderer.render(TOOL_TEMPLATE, HISTORY, True, tokenizer.special_tokens_map, TOOLS)
    finally:
        renderer.close()
    assert rendered == expected
    assert '"name": "get_weather", "arguments": {"city": "Paris", "days": 1}' in rendered
    assert "(for call_1)" in rendered and '"description": "Weather now."' in rendered


# ----- the chat route, through the openai SDK ------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if tools %}Tools: {{ tools | tojson }} Answer with <|python_tag|> and JSON.\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
PING = {"type": "function", "function": {"name": "ping", "description": "Is anyone there?"}}
WEATHER_TOOL = TOOLS[0]
ASK = [{"role": "user", "content": "What is the weather in Paris for three days?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
FORCED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London", "days": 2}}\n</tool_call>'
FORCED_LLAMA3_CALL = '{"name": "get_weather", "parameters": {"city": "London", "days": 2}}'
FORCED_MISTRAL_CALL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "London", "days": 2}}]'


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    """The tiny llama (its template ignores tools; auto reads hermes), an adapter with a hermes-style
    template that renders tools and calls, one with a Llama 3 style template (auto reads llama3_json)
    and one with a Mistral style template (auto reads mistral)."""
    store = tmp_path_factory.mktemp("store")
    templates = (("hermes-tools", TOOL_TEMPLATE), ("llama3-tools", LLAMA3_TEMPLATE), ("mistral-tools", MISTRAL_TEMPLATE))
    for name, template in templates:
        shutil.copytree(llama.adapter_dirs["r4-qv"], store / name)
        (store / name / "chat_template.jinja").write_text(template)
    with LiveServer(server_config(llama.model_dir, store, max_model_len=1024)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session


def call_of(model, client, **fields):
    fields = {"messages": ASK, "tools": [WEATHER_TOOL, PING], "max_tokens": 200, "temperature": 0, **fields}
    return client.chat.completions.create(model=model, **fields).choices[0]


def arguments_match(function) -> None:
    """The call's function (the SDK's, or a dict) names a tool and its arguments are valid against its schema."""
    name, arguments = (function["name"], function["arguments"]) if isinstance(function, dict) else (function.name, function.arguments)
    schema = {"get_weather": WEATHER, "ping": {"type": "object", "properties": {}, "additionalProperties": False}}
    jsonschema.validate(json.loads(arguments), schema[name])


@pytest.mark.parametrize("model", ["tiny-base", "hermes-tools", "llama3-tools"])
def test_a_named_function_is_called_with_arguments_matching_its_schema(client, model):
    choice = call_of(model, client, tool_choice=NAMED, parallel_tool_calls=False)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    arguments_match(call.function)


def test_required_calls_one_of_the_tools(client):
    choice = call_of("hermes-tools", client, tool_choice="required", parallel_tool_calls=False)
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "ping")
    arguments_match(call.function)


def test_a_streamed_call_arrives_as_openai_sends_it_and_matches_the_whole_answer(client):
    whole = call_of("hermes-tools", client, tool_choice=NAMED, parallel_tool_calls=False)
    chunks = list(
        client.chat.completions.create(
            model="hermes-tools", messages=ASK, tools=[WEATHER_TOOL, PING], tool_choice=NAMED,
            parallel_tool_calls=False, max_tokens=200, temperature=0, stream=True,
        )
    )  # fmt: skip
    entries = [entry for chunk in chunks for entry in chunk.choices[0].delta.tool_calls or []]
    first = entries[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(entry.index == 0 and entry.id is None and entry.function.name is None for entry in entries[1:])
    arguments = "".join(entry.function.arguments or "" for entry in entries)
    assert arguments == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def test_each_streamed_choice_numbers_its_own_calls(client):
    chunks = client.chat.completions.create(
        model="tiny-base", messages=ASK, tools=[WEATHER_TOOL, PING], tool_choice="required", parallel_tool_calls=False,
        max_tokens=200, temperature=1.0, seed=7, n=2, stream=True,
    )  # fmt: skip
    calls: dict[int, dict] = {}
    for chunk in chunks:
        (choice,) = chunk.choices
        for entry in choice.delta.tool_calls or []:
            assert entry.index == 0  # one call per choice: each choice counts from 0
            call = calls.setdefault(choice.index, {"name": entry.function.name, "arguments": ""})
            call["arguments"] += entry.function.arguments or ""
    assert set(calls) == {0, 1}
    for call in calls.values():
        arguments_match(call)


def test_the_async_client_gets_the_same_call(client, server):
    async def ask():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            reply = await aclient.chat.completions.create(
                model="tiny-base", messages=ASK, tools=[WEATHER_TOOL], tool_choice=NAMED,
                parallel_tool_calls=False, max_tokens=200, temperature=0,
            )  # fmt: skip
            return reply.choices[0]

    choice = asyncio.run(ask())
    sync = call_of("tiny-base", client, tools=[WEATHER_TOOL], tool_choice=NAMED, parallel_tool_calls=False)
    assert choice.message.tool_calls[0].function.arguments == sync.message.tool_calls[0].function.arguments


def test_parallel_calls_are_each_a_whole_call(client):
    choice = call_of("tiny-base", client, tool_choice=NAMED)
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len({call.id for call in calls}) == len(calls)
    for call in calls:
        assert call.function.name == "get_weather"
        arguments_match(call.function)


@pytest.mark.parametrize(
    ("model", "output", "read"),
    [
        ("hermes-tools", FORCED_CALL, True),
        ("llama3-tools", FORCED_LLAMA3_CALL, True),
        ("llama3-tools", FORCED_CALL, False),  # auto picked llama3_json from the template's text
        ("hermes-tools", FORCED_LLAMA3_CALL, False),
        ("mistral-tools", FORCED_MISTRAL_CALL, True),
        ("mistral-tools", FORCED_CALL, False),
        ("hermes-tools", FORCED_MISTRAL_CALL, False),
    ],
)
def test_auto_reads_calls_out_of_free_text_in_the_templates_format(client, model, output, read):
    """The output forced by structured_outputs (not tool_choice), read as auto reads any text."""
    choice = call_of(model, client, extra_body={"structured_outputs": {"choice": [output]}})
    if not read:
        assert choice.message.tool_calls is None and choice.message.content == output
        return
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "London", "days": 2})


def test_a_mistral_template_gets_required_named_and_streamed_calls(client):
    required = call_of("mistral-tools", client, tool_choice="required", parallel_tool_calls=False)
    assert required.finish_reason == "tool_calls" and required.message.content is None
    (call,) = required.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "ping")
    arguments_match(call.function)

    named = call_of("mistral-tools", client, tool_choice=NAMED, parallel_tool_calls=False)
    assert named.finish_reason == "tool_calls" and named.message.content is None
    (call,) = named.message.tool_calls
    assert call.function.name == "get_weather"
    arguments_match(call.function)

    chunks = list(
        client.chat.completions.create(
            model="mistral-tools", messages=ASK, tools=[WEATHER_TOOL, PING], tool_choice=NAMED,
            parallel_tool_calls=False, max_tokens=200, temperature=0, stream=True,
        )
    )  # fmt: skip
    streamed_calls: dict[int, dict] = {}
    for entry in (entry for chunk in chunks for entry in chunk.choices[0].delta.tool_calls or []):
        if entry.id is not None:
            streamed_calls[entry.index] = {"id": entry.id, "name": entry.function.name, "arguments": ""}
        streamed_calls[entry.index]["arguments"] += entry.function.arguments or ""
    assert [(c["name"], c["arguments"]) for c in streamed_calls.values()] == [
        (call.function.name, call.function.arguments) for call in named.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in streamed_calls.values())
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def test_tool_choice_none_reads_no_calls(client):
    choice = call_of(
        "hermes-tools", client, tool_choice="none", extra_body={"structured_outputs": {"choice": [FORCED_CALL]}}
    )
    assert choice.message.tool_calls is None
    assert choice.message.content == FORCED_CALL and choice.finish_reason == "stop"


def test_a_history_of_calls_and_results_renders_and_answers(client):
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sun"}'},
    ]  # fmt: skip
    choice = call_of("hermes-tools", client, messages=history, tool_choice=NAMED, parallel_tool_calls=False)
    arguments_match(choice.message.tool_calls[0].function)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [PING], "tool_choice": NAMED}, "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": "y" * 70_000}}}]},
         "tools.0.function.parameters"),
        ({"tools": [PING] * 129}, "tools"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"},
         "tool_choice"),
    ],
    ids=["required-without-tools", "named-not-in-tools", "bad-name", "huge-parameters", "too-many-tools",
         "user-tool-calls", "unenforceable-schema"],
)  # fmt: skip
def test_bad_tool_fields_are_a_400_naming_the_field(http, fields, param):
    body = {"model": "tiny-base", "messages": ASK, "max_tokens": 8, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error


def test_constrained_arguments_hold_only_the_declared_parameters_unless_the_schema_allows_more(
    grammar_tokenizer, tokenizer
):
    declared = {"type": "object", "properties": {"a": {"type": "integer"}}}
    open_ended = {**declared, "additionalProperties": True}
    for schema, accepted in ((declared, False), (open_ended, True)):
        lark = call_grammar("llama3_json", [("f", schema)], parallel=False)
        assert accepts(grammar_tokenizer, tokenizer, lark, '{"name": "f", "parameters": {"a": 1, "b": 2}}') == accepted
        assert accepts(grammar_tokenizer, tokenizer, lark, '{"name": "f", "parameters": {"a": 1}}')

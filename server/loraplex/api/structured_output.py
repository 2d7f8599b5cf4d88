"""Structured outputs: what a request asks its output to be, as one llguidance grammar string.

Owns: turning `response_format` (`json_object`, `json_schema`) and vLLM's `structured_outputs`
(`json`, `regex`, `choice`, `grammar`) into the grammar string `SamplingParams.grammar` carries
to the engine (engine/grammar.py builds the matcher from it), the bounds on what a request may
send, checking each grammar with llguidance against the served tokenizer, and an LRU of checked
grammars keyed by what was asked. Everything here is CPU work that can take milliseconds on a large
schema: routes call it through `run_in_threadpool`, never on the event loop. A schema keyword,
regex or grammar llguidance cannot enforce is a `RequestInvalid` (a 400) naming the field and
the library's reason (e.g. `Unimplemented keys: ["uniqueItems"]`), never an unconstrained answer:
the JSON compiler runs with `lenient` off, whatever the schema's `x-guidance` says.

JSON is generated as `json.dumps` writes it (", " and ": " separators, no other whitespace), so
a random or an off-distribution model cannot fill its output with whitespace; a schema's
`x-guidance` may choose other separators. It never touches the engine, HTTP or token ids.

Tool calls build on it: `grammar_for_lark` takes a Lark grammar whose rules may embed JSON
schemas with `%json { ... }` (for example `start: "<tool_call>" %json {"type": "object"}`), and
`grammar_for_schema` takes a function's parameters schema. A bare `%json` gets llguidance's own
JSON defaults (any whitespace, without bound); `lark_json(schema)` writes the `%json` clause with
the options above.
"""

import functools
import json

import llguidance

from loraplex.engine.grammar import grammar_tokenizer, parser_limits
from loraplex.errors import RequestInvalid

MAX_SCHEMA_CHARS = 64 * 1024  # a JSON schema, as compact JSON
MAX_REGEX_CHARS = 4 * 1024
MAX_GRAMMAR_CHARS = 64 * 1024  # a Lark grammar
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024  # one choice
CACHE_SIZE = 256  # checked grammars kept, by what was asked

JSON_DEFAULTS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
JSON_OVERRIDES = {"lenient": False}  # an unimplemented keyword is an error, never ignored


def grammar_for_schema(schema: dict, param: str, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The grammar of JSON values valid against `schema`.

    Args:
        schema: a JSON Schema (an object; `{"type": "object"}` for any JSON object).
        param: the request field that holds it, named by the 400 when it cannot be enforced.
        tokenizer: the served tokenizer (`tokenizer_of`), to check the grammar against; None checks it alone.

    Raises:
        RequestInvalid: not an object, larger than MAX_SCHEMA_CHARS, or a keyword or pattern the
            library cannot enforce (the message names it).
    """
    if not isinstance(schema, dict):
        raise RequestInvalid(f"{param} must be a JSON Schema object, got {type(schema).__name__}", param=param)
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RequestInvalid(f"{param} is not a JSON Schema: {exc}", param=param) from None
    _bound(text, MAX_SCHEMA_CHARS, param)
    return _checked("json", text, param, tokenizer)


def grammar_for_lark(text: str, param: str, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The grammar of a Lark grammar (llguidance's dialect: `start` is the root, `%json {...}` embeds a JSON schema).

    Args:
        text: the Lark grammar, at most MAX_GRAMMAR_CHARS.
        param: the request field that holds it.
        tokenizer: the served tokenizer, so special tokens (`<|eot_id|>`) the grammar names are checked.

    Raises:
        RequestInvalid: not a string, too long, or not a grammar llguidance can enforce (the message says where).
    """
    _bound_string(text, MAX_GRAMMAR_CHARS, param)
    return _checked("lark", text, param, tokenizer)


def lark_json(schema: dict) -> str:
    """`%json {schema}` for a Lark rule, with the JSON options `grammar_for_schema` uses (json.dumps's separators,
    lenient off) in place of any the schema carries."""
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_DEFAULTS, **JSON_OVERRIDES}}, ensure_ascii=False)


def grammar_for_regex(pattern: str, param: str, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The grammar of strings matching `pattern` in full (Rust regex syntax, no look-around or backreferences)."""
    _bound_string(pattern, MAX_REGEX_CHARS, param)
    return _checked("regex", pattern, param, tokenizer)


def grammar_for_choice(choices: list[str], param: str, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The grammar of exactly one of `choices` (literal strings, no regex meaning)."""
    if not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES:
        raise RequestInvalid(f"{param} must be a list of 1 to {MAX_CHOICES} strings", param=param)
    for choice in choices:
        _bound_string(choice, MAX_CHOICE_CHARS, param)
    lark = "start: " + " | ".join(json.dumps(choice) for choice in choices)  # Lark strings escape as JSON's do
    return _checked("lark", lark, param, tokenizer)


def requested_grammar(body, hf_tokenizer, tool_grammar: str | None = None) -> str | None:
    """The grammar a chat or completions body asks for, or None for an unconstrained output.

    Chat's `response_format` (`json_object`: any JSON object; `json_schema`: its `schema`, any
    object when absent) and vLLM's `structured_outputs` (exactly one of `json`, `regex`,
    `choice`, `grammar`, `json_object`), on either route; asking through both is refused.
    Call it off the event loop (the first call builds the tokenizer; a new schema compiles).

    Args:
        body: a `ChatCompletionRequest` or `CompletionRequest`.
        hf_tokenizer: the served base's tokenizer.
        tool_grammar: the grammar chat already chose for tool_choice required or a named function;
            returned as it is, and asking for a format as well is refused.

    Raises:
        RequestInvalid: naming the field at fault.
    """
    response_format = getattr(body, "response_format", None)
    asked = body.structured_outputs
    if response_format is not None and response_format.type == "text":
        response_format = None
    if response_format is not None and asked is not None:
        raise RequestInvalid("use either response_format or structured_outputs, not both", param="structured_outputs")
    if tool_grammar is not None and (response_format is not None or asked is not None):
        param = "structured_outputs" if asked is not None else "response_format"
        raise RequestInvalid(f"{param} cannot be combined with tool_choice required or a named function", param=param)
    if response_format is None and asked is None:
        return tool_grammar
    tokenizer = tokenizer_of(hf_tokenizer)
    if response_format is not None:
        if response_format.type == "json_object":
            if response_format.json_schema is not None:
                raise RequestInvalid("json_schema is only allowed with type json_schema", param="response_format.json_schema")
            return grammar_for_schema({"type": "object"}, "response_format", tokenizer)
        if response_format.json_schema is None:
            raise RequestInvalid("type json_schema needs json_schema", param="response_format.json_schema")
        schema = response_format.json_schema.json_schema
        return grammar_for_schema(
            {"type": "object"} if schema is None else schema, "response_format.json_schema.schema", tokenizer
        )
    fields = {
        name: value
        for name, value in (("json", asked.json_schema), ("regex", asked.regex), ("choice", asked.choice),
                            ("grammar", asked.grammar), ("json_object", asked.json_object or None))
        if value is not None
    }  # fmt: skip
    if len(fields) != 1:
        raise RequestInvalid(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object", param="structured_outputs"
        )
    ((name, value),) = fields.items()
    param = f"structured_outputs.{name}"
    if name == "json":
        return grammar_for_schema(_schema_of(value, param), param, tokenizer)
    if name == "json_object":
        return grammar_for_schema({"type": "object"}, param, tokenizer)
    if name == "regex":
        return grammar_for_regex(value, param, tokenizer)
    if name == "choice":
        return grammar_for_choice(value, param, tokenizer)
    return grammar_for_lark(value, param, tokenizer)


def _schema_of(value, param: str) -> dict:
    """A schema sent as an object, or as JSON text (vLLM takes both)."""
    if isinstance(value, dict):
        return value
    _bound(value, MAX_SCHEMA_CHARS, param)
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise RequestInvalid(f"{param} is neither a JSON Schema object nor JSON text: {exc}", param=param) from None


@functools.lru_cache(maxsize=4)
def tokenizer_of(hf_tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of the served Hugging Face tokenizer, built once (about a second on a large vocabulary)."""
    return grammar_tokenizer(hf_tokenizer)


def _bound(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise RequestInvalid(f"{param} is {len(text)} characters; at most {limit} are allowed", param=param)


def _bound_string(text, limit: int, param: str) -> None:
    if not isinstance(text, str) or not text:
        raise RequestInvalid(f"{param} must be a non-empty string", param=param)
    _bound(text, limit, param)


def _checked(kind: str, spec: str, param: str, tokenizer) -> str:
    grammar, error = _compile(kind, spec, tokenizer)
    if error is not None:
        raise RequestInvalid(f"{param} cannot be enforced: {error}", param=param)
    return grammar


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compile(kind: str, spec: str, tokenizer) -> tuple[str, str | None]:
    """(grammar, None), or (grammar, why llguidance refuses it); errors are cached as results are."""
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_DEFAULTS, overrides=JSON_OVERRIDES)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=parser_limits())
    except (ValueError, TypeError) as exc:  # what the library raises on input it cannot read
        return "", str(exc)
    if is_error:
        return grammar, messages[0].strip()
    if kind == "json" and messages:  # a warning on a schema is something it asks that would not be enforced
        return grammar, "; ".join(m.strip() for m in messages)
    return grammar, None

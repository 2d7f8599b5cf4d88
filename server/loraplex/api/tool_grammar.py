"""The grammar of tool calls: what `tool_choice` required or a named function constrains an output to.

Owns: `call_grammar`, the lark grammar (llguidance's, `%json` for the arguments) whose every
sentence is exactly one call, or several, in one of tool_calls.py's formats, with each call's
arguments held to its function's JSON Schema, and `special_tags`, the formats' tags a tokenizer
holds as special tokens (named by id in the grammar). It builds text only: structured_output.py checks
and compiles it, tool_calls.py reads what the model then writes. It must not know HTTP or the engine.
"""

import json

from loraplex.api.structured_output import lark_json
from loraplex.api.tool_calls import HERMES_CLOSE, HERMES_OPEN, PARSERS, TOOL_CALLS

TAGS = (HERMES_OPEN, HERMES_CLOSE, TOOL_CALLS)  # the fixed text of the formats that may be one special token


def _lark_string(text: str) -> str:
    """`text` as a lark string literal (JSON's escapes are lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _declared_only(schema: dict) -> dict:
    """An arguments schema whose object holds only the declared parameters, unless it says otherwise
    (OpenAI's strict mode requires `additionalProperties: false`; most tools' schemas leave it out)."""
    if schema.get("type") == "object" and not {"additionalProperties", "patternProperties"} & set(schema):
        return {**schema, "additionalProperties": False}
    return schema


def special_tags(tokenizer) -> dict[str, int]:
    """The formats' tags that are special tokens of `tokenizer` (Mistral's `[TOOL_CALLS]`), with their ids.

    llguidance reads a special token as its own symbol, not as its text: a grammar's string
    `"[TOOL_CALLS]"` lets the model sample that token and then refuses it (the matcher wanted the
    bytes `[`, ...), so a grammar must name such a tag by id (`<[id]>`).
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {token.content: token_id for token_id, token in decoder.items() if token.special and token.content in TAGS}


def call_grammar(
    parser: str, functions: list[tuple[str, dict]], parallel: bool, special: dict[str, int] | None = None
) -> str:
    """A lark grammar whose every sentence is a call (several with `parallel`) in `parser`'s format.

    Args:
        parser: one of PARSERS.
        functions: (name, arguments JSON Schema) of each function the call may be to; an object
            schema that does not say whether other keys are allowed allows none.
        parallel: one or more calls (hermes: one block per line; llama3_json: separated by `; `;
            mistral: objects separated by `, ` in the one `[TOOL_CALLS][...]` array), else exactly one.
        special: the tags that are special tokens of the served tokenizer, by id (`special_tags`).
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown tool call parser {parser!r}")
    special = special or {}

    def text(*pieces: str) -> str:
        """Pieces of fixed text as lark terms: a special-token tag by its id, anything else as a string."""
        return " ".join(f"<[{special[piece]}]>" if piece in special else _lark_string(piece) for piece in pieces if piece)

    key, opening, closing, separator, before, after = {  # before and after: around all the calls
        "hermes": ("arguments", (HERMES_OPEN, "\n"), ("\n", HERMES_CLOSE), "\n", (), ()),
        "llama3_json": ("parameters", (), (), "; ", (), ()),
        "mistral": ("arguments", (), (), ", ", (TOOL_CALLS, "["), ("]",)),
    }[parser]
    calls = f"call ({text(separator)} call)*" if parallel else "call"
    if before:
        calls = f"{text(*before)} {calls} {text(*after)}"
    rules = [f"start: {calls}"]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(functions))))
    for i, (name, schema) in enumerate(functions):
        head = "{" + json.dumps("name") + ": " + json.dumps(name) + ", " + json.dumps(key) + ": "
        rules.append(f"call_{i}: {text(*opening, head)} args_{i} {text('}', *closing)}")
        rules.append(f"args_{i}: {lark_json(_declared_only(schema))}")  # as json.dumps writes it, every keyword enforced
    return "\n".join(rules) + "\n"

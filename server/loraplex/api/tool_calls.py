"""Tool calls in generated text: the formats, parsed whole or as a stream of OpenAI's deltas.

Owns: the three formats loraplex reads, as vLLM's parsers of the same names read them:
  - `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks among text
    (Hermes, Qwen 2.5/3 and most templates that document tools);
  - `llama3_json`: the whole output is one or more `{"name": ..., "parameters": {...}}` objects
    separated by `;`, after an optional `<|python_tag|>` (Llama 3.1+; `arguments` is read too);
  - `mistral`: `[TOOL_CALLS]` and a JSON array of `{"name": ..., "arguments": {...}}` objects,
    the text before it the content (Mistral v0.3+, whose tokenizer writes `[TOOL_CALLS]` as a
    special token: the chat route decodes with special tokens when it reads calls);
choosing one from a chat template's text (`parser_for_template`); `ToolCallStream`, which reads
the text a character at a time and says what is new (content, a call's opening with its id and
name, fragments of its arguments), so any chunking of one text gives the same calls and content,
and `parse_tool_calls` is that stream run over the whole text. The grammar that makes a model
write calls in these formats is tool_grammar.py's.

A call's `arguments` is the JSON text of its arguments object as the model wrote it (when the
call opens with its name, as every grammar here and every model we know writes it), so streamed
fragments concatenate to the same string a whole response carries. Text that looks like a call
and is not one (bad JSON, no name) stays in the content as written. Work is linear in the text:
each character is looked at once, and the only regex runs at most once per `{` on a head of at
most MAX_HEAD_CHARS. It must not know HTTP, requests or the engine.
"""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

PARSERS = ("hermes", "llama3_json", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS = "[TOOL_CALLS]"
MAX_HEAD_CHARS = 1024  # `{"name": "...", "arguments": ` longer than this is read whole, not streamed
_HEAD = {
    "hermes": re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*\{', re.S),
    "llama3_json": re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:parameters|arguments)"\s*:\s*\{', re.S),
}
_HEAD["mistral"] = _HEAD["hermes"]
_ARGUMENT_KEYS = {"hermes": ("arguments",), "llama3_json": ("parameters", "arguments"), "mistral": ("arguments",)}
_OPENING_TAG = {"hermes": HERMES_OPEN, "mistral": TOOL_CALLS}  # the tag a format's calls follow in text


def new_call_id() -> str:
    """A call's id, in OpenAI's form (`call_` and 24 characters)."""
    return "call_" + uuid.uuid4().hex[:24]


def parser_for_template(template: str, configured: str) -> str:
    """The format to read: `configured`, or with `auto` the one the chat template's text names.

    A template that mentions `[TOOL_CALLS]` or `[AVAILABLE_TOOLS]` is Mistral's (mistral); one
    that mentions `<|python_tag|>` or the `ipython` role is Llama 3's (llama3_json); any other is
    read as hermes, the format most tool-calling templates document.
    """
    if configured != "auto":
        return configured
    if TOOL_CALLS in template or "[AVAILABLE_TOOLS]" in template:
        return "mistral"
    return "llama3_json" if PYTHON_TAG in template or "ipython" in template else "hermes"


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Parsed:
    """A whole text's content (None when it is only calls) and calls."""

    content: str | None
    calls: list[ParsedCall]


@dataclass
class StreamDelta:
    """What a piece of text added: content, and OpenAI's `delta.tool_calls` entries."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


class _JsonDepth:
    """Where a JSON object ends, a character at a time: nesting, strings and escapes."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self._escaped = False

    def feed(self, ch: str) -> None:
        if self.in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1

    @property
    def closed(self) -> bool:
        return self.depth <= 0 and not self.in_string


def _whole_call(text: str, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete call object written in another order, or None if it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in keys if key in value), None)
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _head_name(head: re.Match | None) -> str | None:
    if head is None:
        return None
    try:
        return json.loads(head[1])
    except ValueError:  # an escape JSON does not have
        return None


class _CallObject:
    """One call object, from its `{`: streams the name and arguments once the head says them.

    Events go to `emit(kind, text)`: ("open", name), then ("arguments", fragment)s. `done` when
    the object closed or broke (`<` outside a string cannot be JSON); `opened` once a call was said.
    """

    def __init__(self, head: re.Pattern, keys: tuple[str, ...], emit: Callable[[str, str], None]):
        self._head, self._keys, self._emit = head, keys, emit
        self.text: list[str] = []
        self._outer = _JsonDepth()
        self._arguments: _JsonDepth | None = None  # while the arguments object streams
        self.opened = False
        self.done = False
        self.valid = False  # done as a whole call

    def feed(self, ch: str) -> None:
        outer, arguments = self._outer, self._arguments
        if ch == "<" and not outer.in_string:
            self.done = True  # not JSON: the caller takes the text back
            return
        self.text.append(ch)
        outer.feed(ch)
        if arguments is not None:
            arguments.feed(ch)
            self._emit("arguments", ch)
            if arguments.closed:
                self._arguments = None
        elif not self.opened and ch == "{" and outer.depth == 2 and len(self.text) <= MAX_HEAD_CHARS:
            name = _head_name(self._head.fullmatch("".join(self.text)))
            if name is not None:
                self.opened = True
                self._emit("open", name)
                self._arguments = _JsonDepth()
                self._arguments.feed(ch)
                self._emit("arguments", ch)
        if outer.closed:
            self.done = True
            if self.opened:
                self.valid = True
            else:
                call = _whole_call("".join(self.text), self._keys)
                if call is not None:
                    self.opened = self.valid = True
                    self._emit("open", call[0])
                    self._emit("arguments", call[1])


class ToolCallStream:
    """Reads one choice's generated text as it comes and says what each piece adds.

    Every character is looked at once and held text is kept in lists, so a whole output (or a
    long run of whitespace) costs time linear in its length.

    Args:
        parser: one of PARSERS.
        new_id: makes a call's id (OpenAI's `call_...`).
        max_calls: calls kept at most (1 with `parallel_tool_calls` false); later ones are dropped.
    """

    def __init__(self, parser: str, new_id: Callable[[], str], max_calls: int | None = None):
        if parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {parser!r}")
        self.parser = parser
        self._new_id = new_id
        self._max_calls = max_calls
        self._head, self._keys, self._tag = _HEAD[parser], _ARGUMENT_KEYS[parser], _OPENING_TAG.get(parser)
        self._calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument fragments)
        self._content: list[str] = []
        self._said: list[str] = []  # content since the last delta
        self._entries: list[tuple[dict, list[str]]] = []  # delta.tool_calls since the last delta, with fragments
        self._dropping = False  # the call being read is past max_calls
        self._state = "start" if parser == "llama3_json" else "text"
        self._held: list[str] = []  # text held back: whitespace, the characters before a call's `{`
        self._mark = ""  # the start of a tag being read (`<tool_c`, `<|python_tag|>`), `;` between calls, mistral's `[`
        self._block: list[str] = []  # hermes: a block's text after its call, or all of one that is not a call
        self._tail = ""  # the block's last characters, to see its closing tag
        self._after_call = False  # hermes, mistral: whitespace after calls is content only if text follows
        self._call: _CallObject | None = None
        self._lead = ""  # the text before the call object's `{` that is content if it is not a call

    @property
    def calls(self) -> list[ParsedCall]:
        return [ParsedCall(call_id, name, "".join(parts)) for call_id, name, parts in self._calls]

    def feed(self, text: str) -> StreamDelta:
        """What `text`, the next piece of the output, adds."""
        for ch in text:
            self._feed(ch)
        return self._take()

    def finish(self) -> StreamDelta:
        """What the end of the output adds (text held back in case a tag or a call followed)."""
        state, held = self._state, "".join(self._held)
        if state == "call" and not self._call.opened:
            self._say(self._lead + "".join(self._call.text))
        elif state == "start":
            self._say(held)
        elif state == "text":
            self._say(held + self._mark if self._mark or not self._after_call else "")  # whitespace after a call
        elif state == "open":
            self._say(HERMES_OPEN + held)
        elif state == "array":  # mistral: `[TOOL_CALLS]` and no call after it
            self._say(held)
        elif state == "raw":
            self._say("".join(self._block))
        self._state, self._held, self._mark = "finished", [], ""
        return self._take()

    def result(self) -> Parsed:
        """Everything read so far: the content (None when there are calls and no text) and the calls."""
        content = "".join(self._content)
        return Parsed(None if self._calls and not content else content, self.calls)

    # ----- the formats, a character at a time ---------------------------------------------------

    def _feed(self, ch: str) -> None:
        state = self._state
        if state == "call":
            self._call.feed(ch)
            if self._call.done:
                self._end_call(ch)
        elif state in ("raw", "after"):
            self._block_char(ch)
        elif state == "text" and self._tag:
            self._tagged_text(ch)
        elif state == "text":
            self._say(ch)
        elif state == "open":  # hermes, after `<tool_call>`: whitespace, then the call's `{`
            self._held.append(ch)
            if ch == "{":
                self._start_call(HERMES_OPEN + "".join(self._held[:-1]))
            elif not ch.isspace():
                self._to_block("raw", HERMES_OPEN + "".join(self._held))
        elif state == "start":
            self._llama_start(ch)
        elif state in ("array", "next", "item"):
            self._mistral_array(ch)
        else:
            self._llama_between(ch)

    def _tagged_text(self, ch: str) -> None:
        """hermes, mistral: text between calls; whitespace waits for what follows, a tag's start for the rest of it."""
        tag = self._tag
        if self._mark:
            mark = self._mark + ch
            if mark == tag:  # whitespace before the calls is not content
                self._mark = ""
                self._state, self._held = ("open", []) if tag == HERMES_OPEN else ("array", [tag])
                return
            if tag.startswith(mark):
                self._mark = mark
                return
            keep = _partial_tag(mark, tag)
            said, self._mark = mark[: len(mark) - keep], mark[len(mark) - keep :]
            text = said.rstrip()
            self._say("".join(self._held) + text)
            self._held, self._after_call = [said[len(text) :]] if len(text) < len(said) else [], False
        elif ch == tag[0]:
            self._mark = ch
        elif ch.isspace():
            self._held.append(ch)
        else:
            self._say("".join(self._held) + ch)
            self._held, self._after_call = [], False

    def _llama_start(self, ch: str) -> None:
        """Before the first call: whitespace and `<|python_tag|>`, then its `{`; anything else is text."""
        self._held.append(ch)
        if ch.isspace():
            if self._mark in ("", PYTHON_TAG):
                return
        else:
            self._mark += ch
            if self._mark in ("{", PYTHON_TAG + "{"):
                self._mark = ""
                self._start_call("".join(self._held[:-1]))
                return
            if PYTHON_TAG.startswith(self._mark):
                return
        self._mark = ""
        self._to_text("".join(self._held))

    def _llama_between(self, ch: str) -> None:
        """After a call: `;` and the next one, or the end; anything else is text."""
        self._held.append(ch)
        if ch.isspace():
            return
        if ch == ";" and not self._mark:
            self._mark = ";"
            return
        if ch == "{" and self._mark:
            self._mark = ""
            self._start_call("")
            return
        self._mark = ""
        self._to_text("".join(self._held))

    def _mistral_array(self, ch: str) -> None:
        """mistral, after `[TOOL_CALLS]`: `[`, call objects separated by `,`, `]`; anything else is text."""
        self._held.append(ch)
        state = self._state
        if ch.isspace():
            return
        if ch == "{" and (state == "item" or (state == "array" and self._mark)):
            self._mark = ""
            self._start_call("".join(self._held[:-1]))
        elif ch == "[" and state == "array" and not self._mark:
            self._mark = ch
        elif ch == "," and state == "next":
            self._state = "item"
        elif ch == "]" and state == "next":  # the array's end: what follows is text, or another `[TOOL_CALLS]`
            self._state, self._held, self._after_call = "text", [], True
        else:
            self._mark = ""
            self._to_text("".join(self._held))

    def _block_char(self, ch: str) -> None:
        """hermes: a character of a block being read to its `</tool_call>`."""
        self._block.append(ch)
        self._tail = (self._tail + ch)[-len(HERMES_CLOSE) :]
        if self._tail != HERMES_CLOSE:
            return
        if self._state == "raw":
            self._say("".join(self._block))
            self._after_call = False
        else:
            self._after_call = True
        self._state, self._held, self._block, self._tail = "text", [], [], ""

    def _to_block(self, state: str, text: str) -> None:
        self._state, self._held, self._block, self._tail = state, [], [], ""
        for ch in text:
            self._block_char(ch)

    # ----- calls ---------------------------------------------------------------------------------

    def _start_call(self, lead: str) -> None:
        self._dropping = self._max_calls is not None and len(self._calls) >= self._max_calls
        self._state, self._held, self._lead = "call", [], lead
        self._call = _CallObject(self._head, self._keys, self._call_event)
        self._call.feed("{")

    def _end_call(self, ch: str) -> None:
        call, self._call = self._call, None
        rest = "<" if ch == "<" and not call.valid else ""  # the `<` that broke it was not taken in
        raw = self._lead + "".join(call.text) + rest
        if self.parser == "hermes" and call.opened:
            self._to_block("after", rest)
        elif self.parser == "hermes":
            self._to_block("raw", raw)
        elif call.valid:
            self._state, self._held = "next" if self.parser == "mistral" else "between", []
        else:
            self._to_text(raw)

    def _call_event(self, kind: str, text: str) -> None:
        if self._dropping:
            return
        if kind == "open":
            call_id = self._new_id()
            self._calls.append((call_id, text, []))
            entry = {"index": len(self._calls) - 1, "id": call_id, "type": "function", "function": {"name": text}}
            self._entries.append((entry, []))
            return
        index = len(self._calls) - 1
        self._calls[index][2].append(text)
        if not self._entries or self._entries[-1][0]["index"] != index:
            self._entries.append(({"index": index, "function": {}}, []))
        self._entries[-1][1].append(text)

    # ----- content -------------------------------------------------------------------------------

    def _to_text(self, text: str) -> None:
        self._state, self._held, self._after_call = "text", [], False
        self._say(text)

    def _say(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._said.append(text)

    def _take(self) -> StreamDelta:
        entries = []
        for entry, fragments in self._entries:
            entry["function"]["arguments"] = "".join(fragments)
            entries.append(entry)
        delta = StreamDelta("".join(self._said), entries)
        self._said, self._entries = [], []
        return delta


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0 when none does)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def parse_tool_calls(parser: str, text: str, new_id: Callable[[], str], max_calls: int | None = None) -> Parsed:
    """A whole output's content and calls: `ToolCallStream` over all of it at once."""
    stream = ToolCallStream(parser, new_id, max_calls)
    stream.feed(text)
    stream.finish()
    return stream.result()

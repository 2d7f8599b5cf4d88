"""The tool-calling parts of a chat request, as strict pydantic models: OpenAI's shapes, bounded.

Owns: `ToolDefinition` (a function's name, description and JSON Schema `parameters`),
`ToolChoice` (`none`, `auto`, `required` or a named function), and `ToolCall` (the calls an
assistant message in the history carries), with the bounds that keep a request's tools small:
at most MAX_TOOLS tools and MAX_TOOL_CALLS calls a message, names as OpenAI allows them, each
`parameters` at most MAX_PARAMETERS_CHARS of JSON and valid Unicode. It must not know how tools
are rendered, generated or parsed (chat_template.py, tool_calls.py and the chat route do that).
"""

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from loraplex.api.text import Text, valid_unicode

MAX_TOOLS = 128  # OpenAI's documented bound on `tools`
MAX_TOOL_CALLS = 128  # calls one assistant message in the history may carry
MAX_DESCRIPTION_CHARS = 16 * 1024
MAX_PARAMETERS_CHARS = 64 * 1024  # a function's JSON Schema, as compact JSON
MAX_ARGUMENTS_CHARS = 1 << 20  # a past call's arguments (a JSON string)
MAX_CALL_ID_CHARS = 1024
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: omitted means none


def _bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema no longer than MAX_PARAMETERS_CHARS as compact JSON, and valid Unicode throughout."""
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if len(text) > MAX_PARAMETERS_CHARS:
        raise ValueError(f"is {len(text)} characters of JSON; the limit is {MAX_PARAMETERS_CHARS}")
    valid_unicode(text)
    return schema


FunctionName = Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
Parameters = Annotated[dict[str, Any], AfterValidator(_bounded_schema)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: FunctionName
    description: Annotated[Text, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    parameters: Parameters | None = None
    strict: bool | None = None  # OpenAI's: follow the schema exactly; constrained calls always do

    @property
    def schema(self) -> dict[str, Any]:
        """The arguments' JSON Schema: `parameters`, or an empty object when it is left out."""
        return self.parameters if self.parameters is not None else EMPTY_PARAMETERS


class ToolDefinition(_Strict):
    """One entry of `tools`: OpenAI's function tool."""

    type: Literal["function"]
    function: FunctionDefinition

    def template_view(self) -> dict[str, Any]:
        """The tool as chat templates read it (transformers passes OpenAI's shape as it is)."""
        return self.model_dump(exclude_none=True)


class ChosenFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    """`{"type": "function", "function": {"name": ...}}`: that function must be called."""

    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: Annotated[Text, Field(max_length=1024)]
    arguments: Annotated[Text, Field(max_length=MAX_ARGUMENTS_CHARS)]


class ToolCall(_Strict):
    """A call an assistant message in the history made."""

    id: Annotated[Text, Field(max_length=MAX_CALL_ID_CHARS)]
    type: Literal["function"]
    function: FunctionCall

    def template_view(self) -> dict[str, Any]:
        """The call as tool-calling chat templates read it: `arguments` as the object it encodes
        (as transformers documents and vLLM passes them); a string that is not a JSON object stays a string."""
        try:
            arguments = json.loads(self.function.arguments)
        except (ValueError, RecursionError):
            arguments = self.function.arguments
        if not isinstance(arguments, dict):
            arguments = self.function.arguments
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": arguments}}


Tools = Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)]
ToolCalls = Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)]

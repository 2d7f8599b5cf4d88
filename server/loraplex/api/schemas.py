"""The request bodies the API accepts, as strict pydantic models.

Owns: field names, types and bounds of every JSON body (OpenAI completions and chat, adapter
merges, the vLLM-style adapter load/unload and tokenizer routes), so that malformed input is
refused at the door with a 400 that names the field. Every number is bounded to what the engine
can hold (seeds to 64 bits, counts to 32 bits; a whole number written `2.0` is the integer 2),
every string and list in length, and every string must be valid Unicode (a lone surrogate cannot
be tokenized or encoded back to UTF-8). Unknown fields are refused rather than silently ignored.
OpenAI parameters that loraplex does not implement are refused with a message saying so;
`check_supported` does that. The sampling controls (OpenAI's penalties and `logit_bias`, vLLM's
`repetition_penalty`, `min_p`, `min_tokens`, ...) are bounded here and again in `SamplingParams`.
OpenAI's fields that do not change what is generated (`metadata`, `store`, `service_tier`,
`user`, ...) are accepted, bounded as OpenAI documents them, and not used. The tool-calling
fields (`tools`, `tool_choice`, an assistant message's `tool_calls`) are tool_schemas.py's
models; the chat request checks the rules between them (`_check_tools`).
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from loraplex.api.structured_output import MAX_CHOICE_CHARS, MAX_CHOICES, MAX_GRAMMAR_CHARS, MAX_REGEX_CHARS
from loraplex.api.text import Text
from loraplex.api.tool_schemas import ToolCalls, ToolChoice, Tools
from loraplex.engine.request import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TOKENS, MAX_PENALTY, MAX_REPETITION_PENALTY
from loraplex.errors import RequestInvalid
from loraplex.merging import MAX_SEED, MERGE_METHODS

MAX_LOGPROBS = 20
MAX_N = 16
MAX_INT32 = (1 << 31) - 1
MIN_INT64, MAX_INT64 = -(1 << 63), (1 << 63) - 1
MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters of one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024
MAX_NAME_CHARS = 1024  # model names, message names, tool call ids, users
MAX_PATH_CHARS = 4096
MAX_MERGE_WEIGHT = 1e3
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's documented bounds
MAX_SAFETY_IDENTIFIER_CHARS = 128  # OpenAI's documented bound


def _whole(value: object) -> object:
    """A float without a fractional part (`2.0`) as the integer it is: JSON has one number type, and
    JSON Schema's "integer" includes such numbers. Anything else is left for strict int validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WHOLE = BeforeValidator(_whole)  # after an int's Field, so its bounds stay JSON Schema's minimum/maximum
Name = Annotated[Text, Field(max_length=MAX_NAME_CHARS)]
ModelName = Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32), WHOLE]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=1 << 20)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
# OpenAI's logit_bias: token ids, written as JSON object keys, to biases.
LogitBias = Annotated[
    dict[
        Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
        Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)],
    ],
    Field(max_length=MAX_LOGIT_BIAS_TOKENS),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far (with include_usage)
    include_obfuscation: bool = True  # OpenAI's padding field; loraplex never sends one


Metadata = Annotated[
    dict[
        Annotated[Text, Field(max_length=MAX_METADATA_KEY_CHARS)],
        Annotated[Text, Field(max_length=MAX_METADATA_VALUE_CHARS)],
    ],
    Field(max_length=MAX_METADATA_PAIRS),
]


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of its constraints (api/structured_output.py enforces them)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_schema: dict[str, Any] | Text | None = Field(default=None, alias="json")  # a JSON Schema, as an object or JSON text
    regex: Annotated[Text, Field(min_length=1, max_length=MAX_REGEX_CHARS)] | None = None
    choice: (
        Annotated[
            list[Annotated[Text, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]], Field(min_length=1, max_length=MAX_CHOICES)
        ]
        | None
    ) = None
    grammar: Annotated[Text, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None  # Lark (llguidance's)
    json_object: bool | None = None


class SamplingBody(_Strict):
    """Parameters completions and chat share."""

    model: ModelName
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT32), WHOLE] = -1
    n: Annotated[int, Field(ge=1, le=MAX_N), WHOLE] = 1
    seed: Annotated[int, Field(ge=MIN_INT64, le=MAX_INT64), WHOLE] | None = None
    stop: (
        Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
        | None
    ) = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's fields that do not change what is generated: accepted, bounded, not used (nothing is stored).
    user: Name | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    safety_identifier: Annotated[Text, Field(max_length=MAX_SAFETY_IDENTIFIER_CHARS)] | None = None
    prompt_cache_key: Name | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None
    # vLLM's extra sampling parameters, sent in the same body.
    repetition_penalty: Annotated[float, Field(gt=0, le=MAX_REPETITION_PENALTY)] = 1.0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    min_tokens: Annotated[int, Field(ge=0, le=MAX_INT32), WHOLE] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None  # vLLM's: not with stream
    structured_outputs: StructuredOutputs | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def controls(self, vocab_size: int) -> dict:
        """The logits controls as `SamplingParams` fields; RequestInvalid for a biased token outside the vocabulary."""
        bias = {int(token): value for token, value in (self.logit_bias or {}).items()}
        outside = next((token for token in bias if token >= vocab_size), None)
        if outside is not None:
            raise RequestInvalid(
                f"logit_bias token id {outside} is not below the vocabulary size ({vocab_size})", param="logit_bias"
            )
        return {
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": bias,
            "min_p": self.min_p,
            "min_tokens": self.min_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
        }

    def check_supported(self) -> None:
        """Refuse OpenAI parameters loraplex accepts by name but does not implement."""
        if self.stream_options is not None and not self.stream:
            raise RequestInvalid("stream_options is only allowed with stream=true", param="stream_options")
        options = self.stream_options
        if options is not None and options.continuous_usage_stats and not options.include_usage:
            raise RequestInvalid(
                "stream_options.continuous_usage_stats needs stream_options.include_usage=true",
                param="stream_options.continuous_usage_stats",
            )
        if self.prompt_logprobs is not None and self.stream:
            raise RequestInvalid("prompt_logprobs are not available with stream=true (as in vLLM)", param="prompt_logprobs")

    @property
    def usage_in_stream(self) -> tuple[bool, bool]:
        """Whether a stream ends with a usage chunk, and whether every chunk carries the usage so far."""
        options = self.stream_options or StreamOptions()
        return options.include_usage, options.include_usage and options.continuous_usage_stats


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: Annotated[Text, Field(max_length=MAX_GRAMMAR_CHARS)] | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")  # absent: any JSON object
    strict: bool | None = None  # loraplex always enforces the schema


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


PromptText = Annotated[Text, Field(min_length=1)]


class CompletionRequest(SamplingBody):
    """`POST /v1/completions`."""

    prompt: (
        PromptText
        | TokenIds
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, Field(ge=0, le=MAX_INT32), WHOLE] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N), WHOLE] | None = None
    suffix: Annotated[Text, Field(max_length=0)] | None = None
    response_format: ResponseFormat | None = None  # vLLM takes chat's on completions too

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise RequestInvalid("best_of other than n is not supported", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise RequestInvalid("max_tokens=0 is only allowed with echo=true", param="max_tokens")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Name | None = None
    tool_call_id: Name | None = None
    tool_calls: ToolCalls | None = None  # an assistant's calls, rendered by tool-calling templates
    # What a response's message carries besides, so a client may send it back as it came
    # (`message.model_dump()` in the openai SDK): an assistant's refusal is its words; the
    # others are accepted only empty, as nothing here produces or renders them.
    refusal: Text | None = None
    annotations: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class Prediction(_Strict):
    """OpenAI's predicted output: a latency hint that never changes the answer, so it is accepted and not used."""

    type: Literal["content"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)]


class ChatCompletionRequest(SamplingBody):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_INT32), WHOLE] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_INT32), WHOLE] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None  # OpenAI's default: auto with tools, none without
    parallel_tool_calls: bool | None = None  # None is OpenAI's default, true
    prediction: Prediction | None = None
    modalities: Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs=true", param="top_logprobs")
        self._check_tools()

    def _check_tools(self) -> None:
        for i, message in enumerate(self.messages):
            if message.tool_calls is not None and message.role != "assistant":
                raise RequestInvalid("only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return
        if not self.tools:
            raise RequestInvalid("tool_choice required or a named function needs tools", param="tool_choice")
        if not isinstance(choice, str) and choice.function.name not in {tool.function.name for tool in self.tools}:
            raise RequestInvalid(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                param="tool_choice.function.name",
            )

    @property
    def tool_mode(self) -> str:
        """none (no tools, or tool_choice none), auto, required, or named (tool_choice names a function)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None or isinstance(self.tool_choice, str):
            return self.tool_choice or "auto"
        return "named"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


AdapterName = Annotated[Text, Field(min_length=1, max_length=64)]


class MergeRequest(_Strict):
    """`POST /v1/adapters/merge`: combine the caller's adapters into a new one (see merging.py)."""

    name: AdapterName
    adapters: Annotated[list[AdapterName], Field(min_length=2, max_length=16)]
    weights: Annotated[list[Annotated[float, Field(ge=-MAX_MERGE_WEIGHT, le=MAX_MERGE_WEIGHT)]], Field(max_length=16)]
    method: Literal[MERGE_METHODS]
    density: Annotated[float, Field(gt=0, le=1)] | None = None
    rank: Annotated[int, Field(ge=1, le=1 << 16), WHOLE] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE] = 0
    overwrite: bool = False


LoraIntId = Annotated[int, Field(ge=MIN_INT64, le=MAX_INT64), WHOLE]


class LoadLoraRequest(_Strict):
    """vLLM's `POST /v1/load_lora_adapter`; `lora_int_id`, which vLLM clients may send, is not used."""

    lora_name: AdapterName
    lora_path: Annotated[Text, Field(min_length=1, max_length=MAX_PATH_CHARS)]
    lora_int_id: LoraIntId | None = None


class UnloadLoraRequest(_Strict):
    """vLLM's `POST /v1/unload_lora_adapter`."""

    lora_name: AdapterName
    lora_int_id: LoraIntId | None = None


class TokenizeRequest(_Strict):
    """vLLM's `POST /tokenize`: exactly one of `prompt` (its completions form) or `messages` (its chat form).

    `add_special_tokens` defaults as vLLM's: true for a prompt, false for messages (the chat
    template adds them); `add_generation_prompt` is for messages only.
    """

    model: ModelName | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestInvalid("send exactly one of prompt (text) and messages (a chat)", param="prompt")

    @property
    def special_tokens(self) -> bool:
        return self.add_special_tokens if self.add_special_tokens is not None else self.messages is None


class DetokenizeRequest(_Strict):
    """vLLM's `POST /detokenize`."""

    model: ModelName | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)]

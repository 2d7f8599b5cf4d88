"""What the server sends, as pydantic models, for the OpenAPI document only.

Owns: the shapes of every body the routes answer with (completions and chat completions, their
streamed chunks, the model list and one model, adapter records, deletions, vLLM's tokenizer
routes, the version, health, OpenAI's error body) and the `responses=` entries the route
decorators declare with them: `errors` (a status with the error shape, `Retry-After` on 429 and
503), `event_stream` (the SSE events of a streamed answer). Every model forbids extra fields, so a
response carrying one the document does not name fails a schema check. Routes build their bodies
as dicts; nothing here is used to build or validate them at run time.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_REF = "#/components/schemas/{model}"
RETRY_STATUSES = (429, 503)


class _Sent(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- errors ------------------------------------------------------------------------------------


class ErrorDetail(_Sent):
    message: str = Field(description="What went wrong, phrased for the caller.")
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error, not_found_error.")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str | int | None = Field(description="A machine-readable code, e.g. model_not_found, queue_full.")


class ErrorBody(_Sent):
    """OpenAI's error shape; every 4xx and 5xx answer carries one."""

    error: ErrorDetail


# ----- generation --------------------------------------------------------------------------------


class Usage(_Sent):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class CompletionLogprobs(_Sent):
    """One entry per token, prompt tokens first when echoing."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(_Sent):
    logprob: float
    rank: int = Field(ge=1, description="1 for the most likely token at that place.")
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]
PROMPT_LOGPROBS = (
    "vLLM's, with prompt_logprobs: null for the first prompt token, then per token a map from token id to its "
    "logprob, rank and text: the prompt's own token and the best alternatives."
)


class CompletionChoice(_Sent):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]
    prompt_logprobs: PromptLogprobs | None = Field(default=None, description=PROMPT_LOGPROBS)


class Completion(_Sent):
    """`POST /v1/completions` with `stream` false."""

    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(_Sent):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(_Sent):
    """One event of a streamed completion; the usage chunk (`stream_options.include_usage`) has no choices."""

    id: str = Field(pattern=r"^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class TopLogprob(_Sent):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Sent):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Sent):
    content: list[TokenLogprob]


class FunctionCall(_Sent):
    name: str
    arguments: str = Field(description="The arguments object as JSON text, as the model wrote it.")


class ToolCall(_Sent):
    id: str = Field(pattern=r"^call_")
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Sent):
    role: Literal["assistant"]
    content: str | None = Field(description="The text; null when the answer is only tool calls.")
    tool_calls: list[ToolCall] | None = Field(
        default=None, min_length=1, description="The calls read out of the text (with tools); absent when none."
    )


ChatFinish = Literal["stop", "length", "tool_calls"]  # tool_calls: it stopped after making calls


class ChatChoice(_Sent):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinish


class ChatCompletion(_Sent):
    """`POST /v1/chat/completions` with `stream` false."""

    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(default=None, description=PROMPT_LOGPROBS)


class FunctionCallDelta(_Sent):
    name: str | None = Field(default=None, description="In a call's first delta only.")
    arguments: str | None = Field(default=None, description="The next fragment of the arguments' JSON text.")


class ToolCallDelta(_Sent):
    """A call's first delta carries its id, type and name; later ones fragments of its arguments."""

    index: int = Field(ge=0, description="The call's place among the choice's calls.")
    id: str | None = Field(default=None, pattern=r"^call_")
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Sent):
    """The first chunk of each choice carries the role; later ones the new text or tool-call deltas, if any."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, min_length=1)


class ChatChunkChoice(_Sent):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinish | None


class ChatCompletionChunk(_Sent):
    """One event of a streamed chat completion; the usage chunk has no choices."""

    id: str = Field(pattern=r"^chatcmpl-")
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ----- models and adapters -----------------------------------------------------------------------


class ModelCard(_Sent):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="The adapter's directory for admins, else its name; the base model's id for it.")
    parent: str | None = Field(description="The base model's id for adapters; null for the base model itself.")
    max_model_len: int = Field(ge=1)


class ModelList(_Sent):
    """The base model first, then every adapter the caller may use."""

    object: Literal["list"]
    data: list[ModelCard] = Field(min_length=1)


class AdapterRecord(_Sent):
    name: str
    object: Literal["adapter"]
    rank: int = Field(ge=1)
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    size_bytes: int = Field(ge=0)
    owner: str | None = Field(description="The owning tenant; null for a shared adapter.")
    shared: bool
    created: int
    source: Literal["store", "path"] = Field(description="store: kept across restarts; path: loaded for this run only.")
    has_chat_template: bool
    tier: Literal["device", "host", "loading", "failed", "disk"] = Field(
        description=(
            "Where this version is now: device, in a slot (a request on it starts at once); host, in host memory, "
            "to be copied into a slot; loading, being read from disk; failed, its read was refused (requests on it "
            "fail, naming why); disk, in the store only, read when a request needs it."
        )
    )


class AdapterList(_Sent):
    object: Literal["list"]
    data: list[AdapterRecord]


class AdapterDeleted(_Sent):
    id: str
    object: Literal["adapter"]
    deleted: Literal[True]


# ----- vLLM's tokenizer routes, and the version -------------------------------------------------


class Tokenized(_Sent):
    """`POST /tokenize`: the prompt's token ids, as the server would run them."""

    count: int = Field(ge=0)
    max_model_len: int = Field(ge=1)
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, description="Each token's string; only with return_token_strs.")


class Detokenized(_Sent):
    """`POST /detokenize`: the text of the token ids, special tokens included."""

    prompt: str


class TokenizerInfo(_Sent):
    """`GET /tokenizer_info`: what a remote tokenizer (lm-evaluation-harness's) needs of the base model's."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None = Field(description="The base model's chat template (adapters may bring their own).")
    model_max_length: int = Field(ge=1, description="The server's max_model_len.")


class VersionInfo(_Sent):
    version: str


# ----- health ------------------------------------------------------------------------------------


class Healthy(_Sent):
    status: Literal["ok"]


class Unhealthy(_Sent):
    status: str = Field(description="Why not: draining, or why the engine loop is not running.")


DOCUMENTED = (
    ErrorBody, Completion, CompletionChunk, ChatCompletion, ChatCompletionChunk,
    ModelList, ModelCard, AdapterRecord, AdapterList, AdapterDeleted, Healthy, Unhealthy,
    Tokenized, Detokenized, TokenizerInfo, VersionInfo,
)  # fmt: skip


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": SCHEMA_REF.format(model=model.__name__)}


def retry_after_header() -> dict:
    return {
        "Retry-After": {
            "description": "Seconds to wait before retrying (--retry-after).",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        }
    }


def error(status: int, description: str) -> dict:
    """One `responses=` entry in OpenAI's error shape."""
    entry: dict = {"description": description, "content": {"application/json": {"schema": _ref(ErrorBody)}}}
    if status in RETRY_STATUSES:
        entry["headers"] = retry_after_header()
    return entry


def errors(described: dict[int, str]) -> dict[int, dict]:
    """`responses=` entries in OpenAI's error shape, one per status, each saying when it happens."""
    return {status: error(status, description) for status, description in described.items()}


def event_stream(chunk: type[BaseModel]) -> dict:
    """The `text/event-stream` content of a streamed answer: `chunk`s, then `[DONE]`.

    A stream that fails after its status line ends with an event carrying OpenAI's error body
    (its `code` may be the HTTP status the failure would have had) instead of `[DONE]`.
    """
    payload = {"anyOf": [_ref(chunk), _ref(ErrorBody)]}
    return {
        "itemSchema": {  # one event; a `schema` here would describe the whole stream
            "description": f"`data: <{chunk.__name__}>` events, then `data: [DONE]`.",
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                    ]
                },
                "event": {"const": "message"},
            },
        },
    }


def generated(response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """The 200 of a generation route: `response` as JSON, or its chunks as SSE with `stream` true."""
    return {
        "model": response,
        "description": f"application/json ({response.__name__}) with stream false; "
        f"text/event-stream ({chunk.__name__} events, then [DONE]) with stream true.",
        "content": {"text/event-stream": event_stream(chunk)},
    }

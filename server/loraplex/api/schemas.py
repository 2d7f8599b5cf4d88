"""The request bodies the API accepts, as strict pydantic models.

Owns: field names, types and bounds of every JSON body (OpenAI completions and chat, the
vLLM-style adapter load/unload), so that malformed input is refused at the door with a 400 that
names the field. Unknown fields are refused rather than silently ignored. OpenAI parameters that
loraplex does not implement are accepted only at their neutral value (e.g. `presence_penalty=0`),
and refused otherwise with a message saying so; `check_supported` does that.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.errors import RequestInvalid

MAX_LOGPROBS = 20
MAX_N = 16

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """Parameters completions and chat share."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not s for s in stops):
            raise RequestInvalid("stop strings must not be empty", param="stop")
        return stops

    def check_supported(self) -> None:
        """Refuse OpenAI parameters loraplex accepts by name but does not implement."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise RequestInvalid(f"{name} is not supported; leave it at 0", param=name)
        if self.logit_bias:
            raise RequestInvalid("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise RequestInvalid("stream_options is only allowed with stream=true", param="stream_options")


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise RequestInvalid("best_of other than n is not supported", param="best_of")
        if self.suffix:
            raise RequestInvalid("suffix is not supported", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise RequestInvalid("max_tokens=0 is only allowed with echo=true", param="max_tokens")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs=true", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class MergeRequest(_Strict):
    """`POST /v1/adapters/merge`: combine the caller's adapters into a new one (see merging.py)."""

    name: str
    adapters: Annotated[list[str], Field(min_length=2, max_length=16)]
    weights: list[float]
    method: str
    density: float | None = None
    rank: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    overwrite: bool = False


class LoadLoraRequest(_Strict):
    """vLLM's `POST /v1/load_lora_adapter`."""

    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Strict):
    """vLLM's `POST /v1/unload_lora_adapter`."""

    lora_name: str
    lora_int_id: int | None = None

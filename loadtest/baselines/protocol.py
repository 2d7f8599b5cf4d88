"""OpenAI's completions protocol as the baseline servers speak it: the request body, errors, SSE.

Owns: the accepted body (one prompt, greedy only: fields that would change the output are refused,
other unknown fields ignored), OpenAI's error shape for every failure with its status code, and the
JSON of completion chunks, usage and server-sent events. It knows no model and no worker.
"""

import json
import time
import uuid

from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# Fields the baselines cannot honour, with the values that ask for nothing (None is always accepted).
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (), "stop": ([], ""), "suffix": ("",)}


class ApiError(Exception):
    """A request the server refuses, rendered as OpenAI's error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionBody(BaseModel):
    """`POST /v1/completions`: one prompt (text or token ids), greedy, vLLM's `ignore_eos` included."""

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[StrictInt]
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float | None = None  # 0, or left out (unlike OpenAI's default of 1): greedy
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        """Refuse what would change the output: sampling, several choices, logprobs, echo, stop strings.

        Raises:
            ApiError: 400 naming the first such field.
        """
        if self.temperature not in (None, 0):
            raise ApiError(400, "only greedy decoding is supported: temperature must be 0", param="temperature")
        for name, allowed in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in allowed:
                raise ApiError(400, f"{name}={value!r} is not supported by this baseline server", param=name)


def error_body(message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


async def api_error_response(_: HttpRequest, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.param, error.code), status_code=error.status)


async def validation_error_response(_: HttpRequest, error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or not a valid `CompletionBody`: 400, naming the first bad field."""
    problems = error.errors()
    if problems and problems[0]["type"] == "json_invalid":
        detail = problems[0].get("ctx", {}).get("error", problems[0]["msg"])
        return JSONResponse(error_body(f"the body is not valid JSON: {detail}"), status_code=400)
    places = [(".".join(str(part) for part in e["loc"] if part != "body"), e["msg"]) for e in problems]
    message = "; ".join(f"{place or 'body'}: {problem}" for place, problem in places) or "invalid request body"
    param = places[0][0].split(".")[0] if places else ""
    return JSONResponse(error_body(message, param or None), status_code=400)


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"

"""Pieces every OpenAI-style response shares: ids, usage, token strings, SSE framing, outcomes.

Owns: how a finished (or failed) generation is turned into the common parts of a completions or
chat response, and the one place where an aborted or failed choice becomes an HTTP error.
"""

import json
import time
import uuid

from loraplex.api.generation import Choice, Generation
from loraplex.engine.request import FinishReason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(generation: Generation) -> dict:
    prompt, completion = generation.num_prompt_tokens, generation.num_generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def error_event(choice: Choice) -> dict:
    """The SSE payload that ends a stream whose choice failed."""
    message = choice.error or "the request was aborted because the server is shutting down"
    return {"error": {"message": message, "type": "internal_error", "param": None, "code": None}}


def token_strings(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text, as OpenAI's logprobs report it."""
    return tokenizer.batch_decode([[token_id] for token_id in token_ids])


def finish_reason(choice: Choice) -> str | None:
    if choice.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return choice.finish_reason.value
    return None

"""Pieces every OpenAI-style response shares: ids, usage, token strings, SSE framing, outcomes.

Owns: how a finished (or failed) generation is turned into the common parts of a completions or
chat response, and the one place where an aborted or failed choice becomes an HTTP error.
"""

import json
import logging
import time
import uuid

from loraplex.api.errors import error_body, status_of
from loraplex.api.generation import Choice, Generation
from loraplex.engine.request import FinishReason
from loraplex.errors import LoraplexError

log = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(generation: Generation) -> dict:
    prompt, completion = generation.num_prompt_tokens, generation.num_generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage_so_far(generation: Generation, continuous: bool) -> dict:
    """What a streamed chunk adds: `usage` up to now with `stream_options.continuous_usage_stats`, else nothing."""
    return {"usage": usage(generation)} if continuous else {}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def error_event(choice: Choice) -> dict:
    """The SSE payload that ends a stream whose choice failed (or was cut by a shutdown)."""
    try:
        choice.raise_for_outcome()
    except LoraplexError as exc:
        status, error_type, code = status_of(exc)
        return error_body(str(exc), error_type, code=code or status)
    return error_body("the request ended without a result", "internal_error")


def stream_failed() -> str:
    """Log the exception being handled and give the SSE event that ends its stream."""
    log.exception("a streaming response failed")
    return sse(error_body("internal server error", "internal_error"))


def token_strings(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text, as OpenAI's logprobs report it."""
    return tokenizer.batch_decode([[token_id] for token_id in token_ids])


def prompt_logprobs_json(tokenizer, prompt_ids: list[int], scored: list, top_n: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing scores it), then for each later one a map
    from token id (as text) to `{logprob, rank, decoded_token}`: the prompt's own token and its `top_n` best alternatives.

    Args:
        prompt_ids: the prompt that ran.
        scored: the engine's (logprob, alternatives, rank) of each prompt token from the second on.
        top_n: alternatives to keep of each (the engine may have scored more for echo's logprobs).
    """
    rows = [([token_id] + [alt for alt, _ in top[:top_n]], logprob, top[:top_n], rank)
            for token_id, (logprob, top, rank) in zip(prompt_ids[1:], scored)]
    texts = iter(token_strings(tokenizer, [token_id for ids, *_ in rows for token_id in ids]))  # one decode call
    entries: list[dict | None] = [None]
    for ids, logprob, alternatives, rank in rows:
        row_texts = [next(texts) for _ in ids]
        entry = {str(ids[0]): {"logprob": logprob, "rank": rank, "decoded_token": row_texts[0]}}
        for place, ((alt, alt_logprob), text) in enumerate(zip(alternatives, row_texts[1:]), start=1):
            entry.setdefault(str(alt), {"logprob": alt_logprob, "rank": place, "decoded_token": text})
        entries.append(entry)
    return entries


def finish_reason(choice: Choice) -> str | None:
    if choice.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return choice.finish_reason.value
    return None

"""The one route skeleton chat and completions share: plan, start, then answer whole or stream.

Owns: what happens to a generating request after its route has turned the body into prompts,
sampling parameters and a `Responder` (the route's wording): checking the token budget against
the context, building each choice's `SamplingParams` (n per prompt, seeds offset per choice),
starting the `Generation`, and either collecting it into one response object or streaming it as
SSE chunks (the route's opening chunks, one chunk per event that says something, the usage chunk,
`[DONE]`; an error event instead when a choice fails; the generation closed whatever happens).
It never formats a choice itself: that is the responder's, so chat and completions differ only
in what they say, not in how a request runs.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi.responses import StreamingResponse
from starlette.requests import Request as HttpRequest

from loraplex.api.generation import Choice, Generation
from loraplex.api.responses import error_event, new_id, now, sse, stream_failed, usage, usage_so_far
from loraplex.api.schemas import SamplingBody
from loraplex.api.services import Services
from loraplex.engine.request import FinishReason, SamplingParams, TokenEvent
from loraplex.errors import RequestInvalid
from loraplex.lora.adapter import LoraAdapter


class Responder(Protocol):
    """How one route words a generation (one responder per request: it may keep per-choice state)."""

    object: str  # the response's `object`, e.g. "chat.completion"
    chunk_object: str  # a streamed chunk's `object`
    id_prefix: str

    def choice(self, choice: Choice) -> dict:
        """A finished choice as the response's `choices` entry."""

    def fields(self, choices: list[Choice]) -> dict:
        """Top-level fields a whole response carries beside `choices` (chat: vLLM's prompt_logprobs)."""

    def opening(self, choice: Choice) -> dict | None:
        """The choice entry streamed before any token (chat: the assistant's role), or None."""

    def delta(self, choice: Choice, event: TokenEvent) -> dict | None:
        """The streamed choice entry for one event (already applied to `choice`), or None to send nothing."""


@dataclass
class Plan:
    """What a route made of a body: the engine's work and the wording of its answer."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # n per prompt, in prompt order
    responder: Responder
    keep_generated: bool = True  # False when only the prompt is scored (completions' echo with max_tokens=0)


def token_budget(longest: int, requested: int | None, max_model_len: int, subject: str, param: str) -> int:
    """The tokens each choice may generate: `requested`, or all the context leaves when it is None.

    Args:
        longest: the longest prompt's tokens.
        requested: the body's max_tokens (None: up to the context).
        max_model_len: prompt plus output tokens of one sequence.
        subject: what the prompt is called in errors ("the prompt", "the messages").
        param: the field a too-long prompt is blamed on.
    """
    if longest >= max_model_len:
        raise RequestInvalid(
            f"{subject}: {longest} tokens; this model's maximum context length is {max_model_len}", param=param
        )
    wanted = requested if requested is not None else max_model_len - longest
    if longest + wanted > max_model_len:
        raise RequestInvalid(
            f"{subject} ({longest} tokens) plus max_tokens ({wanted}) exceed the maximum context length ({max_model_len})",
            param="max_tokens",
        )
    return wanted


def choice_params(body: SamplingBody, vocab_size: int, **fields) -> list[SamplingParams]:
    """The body's `n` choices' sampling parameters: the body's shared controls, `fields`, seed `seed + i` for choice i.

    Args:
        body: a completions or chat body.
        vocab_size: bounds the body's token ids (logit_bias).
        fields: the route's own `SamplingParams` fields (max_tokens, logprobs, ...).
    """
    shared = dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        stop=body.stop_strings(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        **body.controls(vocab_size),
        **fields,
    )
    return [SamplingParams(seed=None if body.seed is None else body.seed + j, **shared) for j in range(body.n)]


async def respond(
    svc: Services,
    tenant: str,
    adapter: LoraAdapter | None,
    body: SamplingBody,
    plan: Plan,
    http_request: HttpRequest,
):
    """Run `plan` and answer: one response object, or an SSE stream when the body asks to stream."""
    generation = Generation(svc, tenant, adapter, plan.prompts, plan.params, keep_generated=plan.keep_generated)
    generation.start(http_request)
    responder = plan.responder
    head = {"id": new_id(responder.id_prefix), "created": now(), "model": body.model}
    if body.stream:
        chunks = _stream(generation, body, responder, {**head, "object": responder.chunk_object})
        return StreamingResponse(chunks, media_type="text/event-stream")
    choices = await generation.collect()
    return {
        "id": head["id"],
        "object": responder.object,
        "created": head["created"],
        "model": body.model,
        "choices": [responder.choice(choice) for choice in choices],
        "usage": usage(generation),
        **responder.fields(choices),
    }


async def _stream(generation: Generation, body: SamplingBody, responder: Responder, head: dict) -> AsyncIterator[str]:
    include_usage, continuous = body.usage_in_stream

    def chunk(entry: dict) -> str:
        return sse({**head, "choices": [entry], **usage_so_far(generation, continuous)})

    try:
        for choice in generation.choices:
            entry = responder.opening(choice)
            if entry is not None:
                yield chunk(entry)
        async for choice, event in generation.events():
            if choice.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                yield sse(error_event(choice))
                return
            entry = responder.delta(choice, event)
            if entry is not None:
                yield chunk(entry)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(generation)})
        yield sse("[DONE]")
    except Exception:  # the status line is sent: end the stream with an error event, not a broken body
        yield stream_failed()
    finally:
        generation.close()

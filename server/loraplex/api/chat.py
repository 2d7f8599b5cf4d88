"""`POST /v1/chat/completions`: chat through the tokenizer's template or the adapter's own.

Owns: rendering messages into a prompt (the adapter directory's chat template when it carries
one, else the base tokenizer's; either way in `ChatTemplateRenderer`'s sandbox processes, never
in this one), per-choice sampling parameters, and the chat response and chunk formats, with
OpenAI's `logprobs.content` entries (`token`, `logprob`, `bytes`, `top_logprobs`).
"""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from loraplex.api.auth import caller
from loraplex.api.chat_template import ChatTemplateRenderer
from loraplex.api.generation import ENGINE_CUT, QUEUE_FULL, Choice, Generation
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.models import MODEL_NOT_FOUND, resolve_model
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.api.response_models import ChatCompletion, ChatCompletionChunk, errors, generated
from loraplex.api.responses import error_event, finish_reason, new_id, now, sse, stream_failed, token_strings, usage, usage_so_far
from loraplex.api.schemas import ChatCompletionRequest, ChatMessage
from loraplex.api.services import Services, services
from loraplex.engine.request import FinishReason, SamplingParams, TopLogprobs
from loraplex.errors import RequestInvalid
from loraplex.service.catalog import AdapterRecord
from loraplex.tenancy import Principal

router = APIRouter(route_class=StrictJsonRoute)


def render_prompt(
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    record: AdapterRecord | None,
    encoder: PromptEncoder,
    renderer: ChatTemplateRenderer,
    add_special_tokens: bool = False,
) -> list[int]:
    """The prompt's token ids: messages through the adapter's template, else the tokenizer's.

    Args:
        messages: the conversation.
        add_generation_prompt: end with the template's cue for the assistant's turn.
        record: the adapter whose template comes first (None: the base model).
        encoder: the bounded tokenizer.
        renderer: the sandboxed template renderer.
        add_special_tokens: the tokenizer's own special tokens on top of the template's (vLLM's tokenize option).
    """
    tokenizer = encoder.tokenizer
    template = record.chat_template if record is not None else None
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestInvalid("this model has no chat template; use /v1/completions", param="messages")
        try:
            template = tokenizer.get_chat_template()  # picks "default" from a dict of named templates
        except ValueError as exc:
            raise RequestInvalid(f"this model's chat template cannot be chosen: {exc}", param="messages") from None
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    text = renderer.render(template, conversation, add_generation_prompt, tokenizer.special_tokens_map)
    ids = encoder.encode(text, "messages", "the rendered prompt", add_special_tokens=add_special_tokens)
    if not ids:
        raise RequestInvalid("the rendered prompt is empty", param="messages")
    return ids


def _params(
    body: ChatCompletionRequest, prompt: list[int], max_model_len: int, vocab_size: int
) -> list[SamplingParams]:
    if len(prompt) >= max_model_len:
        raise RequestInvalid(
            f"the messages take {len(prompt)} tokens; this model's maximum context length is {max_model_len}",
            param="messages",
        )
    wanted = body.token_limit if body.token_limit is not None else max_model_len - len(prompt)
    if len(prompt) + wanted > max_model_len:
        raise RequestInvalid(
            f"the messages ({len(prompt)} tokens) plus max_tokens ({wanted}) exceed the maximum context length "
            f"({max_model_len})",
            param="max_tokens",
        )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    controls = body.controls(vocab_size)
    return [
        SamplingParams(
            max_tokens=wanted,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=None if body.seed is None else body.seed + j,
            stop=body.stop_strings(),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            **controls,
        )
        for j in range(body.n)
    ]


def _content_logprobs(tokenizer, ids: list[int], logprobs: list[float], tops: list[TopLogprobs]) -> list[dict]:
    entries = []
    for text, logprob, top in zip(token_strings(tokenizer, ids), logprobs, tops):
        alternatives = token_strings(tokenizer, [token_id for token_id, _ in top])
        entries.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": alt, "logprob": alt_logprob, "bytes": list(alt.encode())}
                    for alt, (_, alt_logprob) in zip(alternatives, top)
                ],
            }
        )
    return entries


def _choice_json(choice: Choice, body: ChatCompletionRequest, tokenizer) -> dict:
    logprobs = None
    if body.logprobs:
        logprobs = {"content": _content_logprobs(tokenizer, choice.token_ids, choice.logprobs, choice.top_logprobs)}
    return {
        "index": choice.index,
        "message": {"role": "assistant", "content": choice.text},
        "logprobs": logprobs,
        "finish_reason": finish_reason(choice),
    }


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: generated(ChatCompletion, ChatCompletionChunk),
        **errors(
            {
                400: "The body is invalid (the message names the field), the chat template fails or is missing, the "
                "rendered prompt is too long for the context, or a parameter is not supported.",
                404: MODEL_NOT_FOUND,
                429: QUEUE_FULL,
                503: ENGINE_CUT,
            }
        ),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    http_request: Request,
    svc: Services = Depends(services),
    principal: Principal = Depends(caller),
):
    body.check_supported()
    record = resolve_model(svc, principal, body.model)
    tokenizer = svc.engine.base.tokenizer
    prompt = await run_in_threadpool(
        render_prompt, body.messages, body.add_generation_prompt, record, svc.prompts, svc.chat_templates
    )  # off the loop
    params = _params(body, prompt, svc.engine.max_model_len, svc.engine.vocab_size)
    generation = Generation(svc, principal.tenant, record and record.adapter, [prompt], params)
    generation.start(http_request)
    response_id, created = new_id("chatcmpl"), now()
    if body.stream:
        return StreamingResponse(_stream(generation, body, response_id, created), media_type="text/event-stream")
    choices = await generation.collect()
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [_choice_json(choice, body, tokenizer) for choice in choices],
        "usage": usage(generation),
    }


async def _stream(generation: Generation, body: ChatCompletionRequest, response_id: str, created: int):
    tokenizer = generation.tokenizer
    include_usage, continuous = body.usage_in_stream
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": body.model}

    def chunk(index: int, delta: dict, logprobs=None, reason=None) -> str:
        choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
        return sse({**base, "choices": choices, **usage_so_far(generation, continuous)})

    try:
        for choice in generation.choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        async for choice, event in generation.events():
            if choice.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                yield sse(error_event(choice))
                return
            reason = finish_reason(choice)
            logprobs = None
            if body.logprobs and event.token_id is not None:
                entries = _content_logprobs(tokenizer, [event.token_id], [event.logprob], [event.top_logprobs or []])
                logprobs = {"content": entries}
            if not event.text and reason is None and logprobs is None:
                continue
            yield chunk(choice.index, {"content": event.text} if event.text else {}, logprobs, reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(generation)})
        yield sse("[DONE]")
    except Exception:  # the status line is sent: end the stream with an error event, not a broken body
        yield stream_failed()
    finally:
        generation.close()

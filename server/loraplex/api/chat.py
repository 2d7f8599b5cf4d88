"""`POST /v1/chat/completions`: chat through the tokenizer's template or the adapter's own.

Owns: rendering messages into a prompt (the adapter directory's chat template when it carries
one, else the base tokenizer's; either way in `ChatTemplateRenderer`'s sandbox processes, never
in this one), per-choice sampling parameters, and `ChatResponder`: the chat response and chunk
formats, with OpenAI's `logprobs.content` entries (`token`, `logprob`, `bytes`, `top_logprobs`).
How the request runs and streams is route.py's, shared with completions.
"""

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from loraplex.api.auth import caller
from loraplex.api.chat_template import ChatTemplateRenderer
from loraplex.api.generation import ENGINE_CUT, QUEUE_FULL, Choice
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.models import MODEL_NOT_FOUND, resolve_model
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.api.response_models import ChatCompletion, ChatCompletionChunk, errors, generated
from loraplex.api.responses import finish_reason, token_strings
from loraplex.api.route import Plan, choice_params, respond, token_budget
from loraplex.api.schemas import ChatCompletionRequest, ChatMessage
from loraplex.api.services import Services, services
from loraplex.api.structured_output import requested_grammar
from loraplex.engine.request import SamplingParams, TokenEvent, TopLogprobs
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
    body: ChatCompletionRequest, prompt: list[int], max_model_len: int, vocab_size: int, grammar: str | None
) -> list[SamplingParams]:
    wanted = token_budget(len(prompt), body.token_limit, max_model_len, "the messages", "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return choice_params(body, vocab_size, max_tokens=wanted, logprobs=logprobs, grammar=grammar)


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


class ChatResponder:
    """Chat's wording: `message` in a response, `delta` in a chunk (the role first), `logprobs.content`."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, body: ChatCompletionRequest, tokenizer):
        self._body = body
        self._tokenizer = tokenizer

    def choice(self, choice: Choice) -> dict:
        logprobs = None
        if self._body.logprobs:
            entries = _content_logprobs(self._tokenizer, choice.token_ids, choice.logprobs, choice.top_logprobs)
            logprobs = {"content": entries}
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": logprobs,
            "finish_reason": finish_reason(choice),
        }

    def opening(self, choice: Choice) -> dict:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, choice: Choice, event: TokenEvent) -> dict | None:
        reason = finish_reason(choice)
        logprobs = None
        if self._body.logprobs and event.token_id is not None:
            entries = _content_logprobs(self._tokenizer, [event.token_id], [event.logprob], [event.top_logprobs or []])
            logprobs = {"content": entries}
        if not event.text and reason is None and logprobs is None:
            return None
        delta = {"content": event.text} if event.text else {}
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


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
    prompt = await run_in_threadpool(
        render_prompt, body.messages, body.add_generation_prompt, record, svc.prompts, svc.chat_templates
    )  # off the loop
    grammar = await run_in_threadpool(requested_grammar, body, svc.engine.base.tokenizer)  # response_format, structured_outputs
    params = _params(body, prompt, svc.engine.max_model_len, svc.engine.vocab_size, grammar)
    plan = Plan([prompt], params, ChatResponder(body, svc.engine.base.tokenizer))
    return await respond(svc, principal.tenant, record and record.adapter, body, plan, http_request)

"""`POST /v1/chat/completions`: chat through the tokenizer's template or the adapter's own.

Owns: rendering messages into a prompt (the adapter directory's chat template when it carries
one, else the base tokenizer's; either way in `ChatTemplateRenderer`'s sandbox processes, never
in this one), with the request's `tools` and the history's tool calls; per-choice sampling
parameters (with tool_choice required or a named function, the grammar that makes the output
calls); and `ChatResponder`: the chat response and chunk formats, with OpenAI's
`logprobs.content` entries (`token`, `logprob`, `bytes`, `top_logprobs`) and the tool calls
read out of each choice (tool_calls.py's parsers, whole or streamed as deltas).
How the request runs and streams is route.py's, shared with completions.
"""

import dataclasses

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from loraplex.api.auth import caller
from loraplex.api.chat_template import ChatTemplateRenderer
from loraplex.api.generation import ENGINE_CUT, QUEUE_FULL, Choice
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.models import MODEL_NOT_FOUND, resolve_model
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.api.response_models import ChatCompletion, ChatCompletionChunk, errors, generated
from loraplex.api.responses import finish_reason, prompt_logprobs_json, token_strings
from loraplex.api.route import Plan, choice_params, respond, token_budget
from loraplex.api.schemas import ChatCompletionRequest, ChatMessage
from loraplex.api.services import Services, services
from loraplex.api.structured_output import grammar_for_lark, requested_grammar
from loraplex.api.tool_calls import ToolCallStream, new_call_id, parse_tool_calls, parser_for_template
from loraplex.api.tool_grammar import call_grammar, special_tags
from loraplex.api.tool_schemas import ToolDefinition
from loraplex.engine.request import SamplingParams, TokenEvent, TopLogprobs
from loraplex.errors import RequestInvalid
from loraplex.service.catalog import AdapterRecord
from loraplex.tenancy import Principal

router = APIRouter(route_class=StrictJsonRoute)


def chat_template(record: AdapterRecord | None, tokenizer) -> str:
    """The template messages render through: the adapter's own, else the tokenizer's; RequestInvalid if none."""
    if record is not None and record.chat_template is not None:
        return record.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise RequestInvalid("this model has no chat template; use /v1/completions", param="messages")
    try:
        return tokenizer.get_chat_template()  # picks "default" from a dict of named templates
    except ValueError as exc:
        raise RequestInvalid(f"this model's chat template cannot be chosen: {exc}", param="messages") from None


def _template_message(message: ChatMessage) -> dict:
    """A message as templates read it; an assistant's tool calls with their arguments as objects."""
    calls = None if message.tool_calls is None else [call.template_view() for call in message.tool_calls]
    return {
        "role": message.role,
        "content": message.text(),
        "name": message.name,
        "tool_call_id": message.tool_call_id,
        "tool_calls": calls,
    }


def render_prompt(
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    record: AdapterRecord | None,
    encoder: PromptEncoder,
    renderer: ChatTemplateRenderer,
    add_special_tokens: bool = False,
    tools: list[ToolDefinition] | None = None,
) -> list[int]:
    """The prompt's token ids: messages through the adapter's template, else the tokenizer's.

    Args:
        messages: the conversation.
        add_generation_prompt: end with the template's cue for the assistant's turn.
        record: the adapter whose template comes first (None: the base model).
        encoder: the bounded tokenizer.
        renderer: the sandboxed template renderer.
        add_special_tokens: the tokenizer's own special tokens on top of the template's (vLLM's tokenize option).
        tools: the tools the template is given (its `tools` variable), or None.
    """
    tokenizer = encoder.tokenizer
    template = chat_template(record, tokenizer)
    conversation = [_template_message(m) for m in messages]
    tool_views = None if tools is None else [tool.template_view() for tool in tools]
    text = renderer.render(template, conversation, add_generation_prompt, tokenizer.special_tokens_map, tool_views)
    ids = encoder.encode(text, "messages", "the rendered prompt", add_special_tokens=add_special_tokens)
    if not ids:
        raise RequestInvalid("the rendered prompt is empty", param="messages")
    return ids


def _params(
    body: ChatCompletionRequest, prompt: list[int], max_model_len: int, vocab_size: int, grammar: str | None
) -> list[SamplingParams]:
    wanted = token_budget(len(prompt), body.token_limit, max_model_len, "the messages", "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = choice_params(
        body, vocab_size, max_tokens=wanted, logprobs=logprobs, prompt_logprobs=body.prompt_logprobs, grammar=grammar
    )
    # The choices share one prompt: the first scores it, the others may start from its cached blocks.
    return params[:1] + [dataclasses.replace(p, prompt_logprobs=None) for p in params[1:]]


def _tool_grammar(body: ChatCompletionRequest, parser: str, tokenizer) -> str | None:
    """With tool_choice required or a named function, the grammar that makes the output such calls."""
    if body.tool_mode not in ("required", "named"):
        return None
    tools = body.tools
    if body.tool_mode == "named":
        tools = [tool for tool in tools if tool.function.name == body.tool_choice.function.name][:1]
    functions = [(tool.function.name, tool.function.schema) for tool in tools]
    lark = call_grammar(parser, functions, body.parallel_tool_calls is not False, special_tags(tokenizer))
    return grammar_for_lark(lark, "tool_choice")


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
    """Chat's wording: `message` in a response, `delta` in a chunk (the role first), `logprobs.content`.

    With a tool call parser, each choice's text is read for calls: `message.tool_calls` (and the
    content left around them), or streamed `delta.tool_calls`, and `finish_reason` tool_calls
    when a choice that stopped made any.

    Args:
        body: the request.
        tokenizer: the base's tokenizer (logprobs' token strings).
        parser: the tool call format to read (tool_calls.PARSERS), or None to read none.
    """

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, body: ChatCompletionRequest, tokenizer, parser: str | None = None):
        self._body = body
        self._tokenizer = tokenizer
        self._parser = parser
        self._max_calls = 1 if body.parallel_tool_calls is False else None
        self._streams: dict[int, ToolCallStream] = {}  # per choice index, while streaming

    def choice(self, choice: Choice) -> dict:
        logprobs = None
        if self._body.logprobs:
            entries = _content_logprobs(self._tokenizer, choice.token_ids, choice.logprobs, choice.top_logprobs)
            logprobs = {"content": entries}
        message: dict = {"role": "assistant", "content": choice.text}
        reason = finish_reason(choice)
        if self._parser is not None:
            parsed = parse_tool_calls(self._parser, choice.text, new_call_id, self._max_calls)
            message["content"] = parsed.content
            if parsed.calls:
                message["tool_calls"] = [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    for call in parsed.calls
                ]
                reason = _called(reason)
        return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def fields(self, choices: list[Choice]) -> dict:
        """vLLM's `prompt_logprobs` of the one prompt every choice shares, beside the choices."""
        asked = self._body.prompt_logprobs
        if asked is None:
            return {}
        first = choices[0]
        return {"prompt_logprobs": prompt_logprobs_json(self._tokenizer, first.prompt_ids, first.prompt_logprobs or [], asked)}

    def opening(self, choice: Choice) -> dict:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, choice: Choice, event: TokenEvent) -> dict | None:
        reason = finish_reason(choice)
        logprobs = None
        if self._body.logprobs and event.token_id is not None:
            entries = _content_logprobs(self._tokenizer, [event.token_id], [event.logprob], [event.top_logprobs or []])
            logprobs = {"content": entries}
        text, calls = event.text, []
        if self._parser is not None:
            stream = self._streams.setdefault(choice.index, ToolCallStream(self._parser, new_call_id, self._max_calls))
            said = stream.feed(text)
            text, calls = said.content, said.tool_calls
            if reason is not None:
                text += stream.finish().content
                reason = _called(reason) if stream.calls else reason
        if not text and not calls and reason is None and logprobs is None:
            return None
        delta: dict = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def _called(reason: str | None) -> str | None:
    """A choice that stopped after making calls finished for them (OpenAI's tool_calls); length stays length."""
    return "tool_calls" if reason == "stop" else reason


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
    tools, parser = None, None
    if body.tool_mode != "none":
        tools, parser = body.tools, parser_for_template(chat_template(record, tokenizer), svc.config.tool_call_parser)
        if "skip_special_tokens" not in body.model_fields_set:  # a format's tags may be special tokens (vLLM's rule)
            body = body.model_copy(update={"skip_special_tokens": False})
    prompt = await run_in_threadpool(
        render_prompt, body.messages, body.add_generation_prompt, record, svc.prompts, svc.chat_templates, False, tools
    )  # off the loop
    grammar = None if parser is None else await run_in_threadpool(_tool_grammar, body, parser, tokenizer)
    grammar = await run_in_threadpool(requested_grammar, body, tokenizer, grammar)  # response_format, structured_outputs
    params = _params(body, prompt, svc.engine.max_model_len, svc.engine.vocab_size, grammar)
    plan = Plan([prompt], params, ChatResponder(body, tokenizer, parser))
    return await respond(svc, principal.tenant, record and record.adapter, body, plan, http_request)

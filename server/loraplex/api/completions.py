"""`POST /v1/completions`: OpenAI's legacy completions, streaming or not.

Owns: turning a `CompletionRequest` into token-id prompts and per-choice sampling parameters
(prompts x n, seeds offset per choice), `echo` with prompt logprobs (what lm-evaluation-harness's
loglikelihood tasks read, `max_tokens=0` included), and the response and chunk formats with
OpenAI's `logprobs` block (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
"""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from loraplex.api.auth import caller
from loraplex.api.generation import ENGINE_CUT, QUEUE_FULL, Choice, Generation
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.models import MODEL_NOT_FOUND, resolve_model
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.api.response_models import Completion, CompletionChunk, errors, generated
from loraplex.api.responses import error_event, finish_reason, new_id, now, sse, stream_failed, token_strings, usage, usage_so_far
from loraplex.api.schemas import CompletionRequest
from loraplex.api.services import Services, services
from loraplex.engine.request import FinishReason, SamplingParams, TopLogprobs
from loraplex.errors import RequestInvalid
from loraplex.tenancy import Principal

router = APIRouter(route_class=StrictJsonRoute)


def _prompts(body: CompletionRequest, encoder: PromptEncoder) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    else:
        prompts = list(prompt)
    if isinstance(prompts[0], list):
        return [list(ids) for ids in prompts]
    encoded = []
    for index, text in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        ids = encoder.encode(text, "prompt", where)
        if not ids:
            raise RequestInvalid(f"{where} is empty", param="prompt")
        encoded.append(ids)
    return encoded


def _params(
    body: CompletionRequest, prompts: list[list[int]], max_model_len: int, vocab_size: int
) -> list[SamplingParams]:
    longest = max(len(ids) for ids in prompts)
    if longest >= max_model_len:
        raise RequestInvalid(
            f"the prompt has {longest} tokens; this model's maximum context length is {max_model_len}", param="prompt"
        )
    wanted = body.max_tokens if body.max_tokens is not None else max_model_len - longest
    if longest + wanted > max_model_len:
        raise RequestInvalid(
            f"the prompt ({longest} tokens) plus max_tokens ({wanted}) exceeds the maximum context length "
            f"({max_model_len})",
            param="max_tokens",
        )
    logprobs = body.logprobs
    controls = body.controls(vocab_size)
    params = []
    for _ in prompts:
        for j in range(body.n):
            params.append(
                SamplingParams(
                    max_tokens=max(wanted, 1),  # echo with max_tokens=0 scores the prompt and drops the token
                    temperature=body.temperature,
                    top_p=body.top_p,
                    top_k=max(body.top_k, 0),
                    seed=None if body.seed is None else body.seed + j,
                    stop=body.stop_strings(),
                    stop_token_ids=tuple(body.stop_token_ids or ()),
                    ignore_eos=body.ignore_eos,
                    logprobs=logprobs,
                    prompt_logprobs=logprobs if body.echo and logprobs is not None else None,
                    **controls,
                )
            )
    return params


def _top_dict(tokenizer, chosen: int, chosen_logprob: float | None, top: TopLogprobs) -> dict[str, float]:
    """Alternatives by text, best first; tokens that decode alike keep the best one's logprob."""
    ids = [token_id for token_id, _ in top] + [chosen]
    texts = token_strings(tokenizer, ids)
    entries: dict[str, float] = {}
    for text, (_, logprob) in zip(texts, top, strict=False):
        entries.setdefault(text, logprob)
    if chosen_logprob is not None:
        entries.setdefault(texts[-1], chosen_logprob)
    return entries


def _logprobs_block(tokenizer, ids: list[int], logprobs: list, tops: list, start_offset: int) -> dict:
    """OpenAI's completions `logprobs`: one entry per token (prompt tokens first when echoing)."""
    texts = token_strings(tokenizer, ids)
    offsets, position = [], start_offset
    for text in texts:
        offsets.append(position)
        position += len(text)
    top_dicts = [
        None if top is None else _top_dict(tokenizer, token_id, logprob, top)
        for token_id, logprob, top in zip(ids, logprobs, tops)
    ]
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top_dicts, "text_offset": offsets}


class _Echo:
    """What echo adds in front of a choice: the prompt as sent, and its tokens' logprobs.

    A text prompt is echoed as it came (not decoded back, which would show the special tokens the
    tokenizer added, e.g. `<s>`); token ids are decoded as they are. Decoding runs on the thread pool.
    """

    def __init__(self, body: CompletionRequest, tokenizer, prompts: list[list[int]]):
        self.enabled = body.echo
        self.drop_generated = body.echo and body.max_tokens == 0
        self._n = body.n
        self._texts: list[str] = []
        if not self.enabled:
            return
        if isinstance(body.prompt, str):
            self._texts = [body.prompt]
        elif isinstance(body.prompt[0], str):
            self._texts = list(body.prompt)
        else:
            self._texts = [tokenizer.decode(ids) for ids in prompts]

    def prompt_text(self, choice: Choice) -> str:
        return self._texts[choice.index // self._n] if self.enabled else ""

    def prompt_scores(self, choice: Choice) -> tuple[list, list]:
        if not self.enabled or choice.prompt_logprobs is None:
            return [], []
        scored = choice.prompt_logprobs
        return [None] + [lp for lp, _ in scored], [None] + [top for _, top in scored]


def _choice_json(choice: Choice, echo: _Echo, body: CompletionRequest, tokenizer) -> dict:
    token_ids, text = choice.token_ids, choice.text
    logprobs, tops = choice.logprobs, choice.top_logprobs
    prompt_text = echo.prompt_text(choice)
    block = None
    if body.logprobs is not None:
        prompt_lps, prompt_tops = echo.prompt_scores(choice)
        ids = (choice.prompt_ids if echo.enabled else []) + token_ids
        block = _logprobs_block(tokenizer, ids, prompt_lps + logprobs, prompt_tops + tops, 0)
    reason = "length" if echo.drop_generated else finish_reason(choice)
    return {"index": choice.index, "text": prompt_text + text, "logprobs": block, "finish_reason": reason}


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: generated(Completion, CompletionChunk),
        **errors(
            {
                400: "The body is invalid (the message names the field), a prompt is too long for the context, "
                "a parameter is not supported, or the request has more choices than the queue holds.",
                404: MODEL_NOT_FOUND,
                429: QUEUE_FULL,
                503: ENGINE_CUT,
            }
        ),
    },
)
async def create_completion(
    body: CompletionRequest,
    http_request: Request,
    svc: Services = Depends(services),
    principal: Principal = Depends(caller),
):
    body.check_supported()
    record = resolve_model(svc, principal, body.model)
    tokenizer = svc.engine.base.tokenizer
    prompts = await run_in_threadpool(_prompts, body, svc.prompts)  # long prompts must not stall the loop
    params = _params(body, prompts, svc.engine.max_model_len, svc.engine.vocab_size)
    echo = await run_in_threadpool(_Echo, body, tokenizer, prompts)
    adapter = record and record.adapter
    generation = Generation(svc, principal.tenant, adapter, prompts, params, keep_generated=not echo.drop_generated)
    generation.start(http_request)
    response_id, created = new_id("cmpl"), now()
    if body.stream:
        return StreamingResponse(_stream(generation, body, echo, response_id, created), media_type="text/event-stream")
    choices = await generation.collect()
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": [_choice_json(choice, echo, body, tokenizer) for choice in choices],
        "usage": usage(generation),
    }


async def _stream(generation: Generation, body: CompletionRequest, echo: _Echo, response_id: str, created: int):
    tokenizer = generation.tokenizer
    include_usage, continuous = body.usage_in_stream
    started: set[int] = set()
    base = {"id": response_id, "object": "text_completion", "created": created, "model": body.model}
    try:
        async for choice, event in generation.events():
            if choice.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                yield sse(error_event(choice))
                return
            first = choice.index not in started
            started.add(choice.index)
            text, ids, lps, tops = event.text, [], [], []
            if event.token_id is not None and not echo.drop_generated:
                ids, lps, tops = [event.token_id], [event.logprob], [event.top_logprobs]
            else:
                text = ""
            if first and echo.enabled:
                text = echo.prompt_text(choice) + text
                prompt_lps, prompt_tops = echo.prompt_scores(choice)
                ids, lps, tops = choice.prompt_ids + ids, prompt_lps + lps, prompt_tops + tops
            reason = "length" if echo.drop_generated and choice.finish_reason else finish_reason(choice)
            if not text and reason is None and (body.logprobs is None or not ids):
                continue
            block = _logprobs_block(tokenizer, ids, lps, tops, 0) if body.logprobs is not None else None
            choices = [{"index": choice.index, "text": text, "logprobs": block, "finish_reason": reason}]
            yield sse({**base, "choices": choices, **usage_so_far(generation, continuous)})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(generation)})
        yield sse("[DONE]")
    except Exception:  # the status line is sent: end the stream with an error event, not a broken body
        yield stream_failed()
    finally:
        generation.close()

"""`POST /v1/completions`: OpenAI's legacy completions, streaming or not.

Owns: turning a `CompletionRequest` into token-id prompts and per-choice sampling parameters
(prompts x n, seeds offset per choice), `echo` with prompt logprobs (what lm-evaluation-harness's
loglikelihood tasks read, `max_tokens=0` included), and the response and chunk formats with
OpenAI's `logprobs` block (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), in
`CompletionResponder`. How the request runs and streams is route.py's, shared with chat.
"""

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from loraplex.api.auth import caller
from loraplex.api.generation import ENGINE_CUT, QUEUE_FULL, Choice
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.models import MODEL_NOT_FOUND, resolve_model
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.api.response_models import Completion, CompletionChunk, errors, generated
from loraplex.api.responses import finish_reason, prompt_logprobs_json, token_strings
from loraplex.api.route import Plan, choice_params, respond, token_budget
from loraplex.api.schemas import CompletionRequest
from loraplex.api.services import Services, services
from loraplex.api.structured_output import requested_grammar
from loraplex.engine.request import SamplingParams, TokenEvent, TopLogprobs
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
    body: CompletionRequest, prompts: list[list[int]], max_model_len: int, vocab_size: int, grammar: str | None
) -> list[SamplingParams]:
    wanted = token_budget(max(len(ids) for ids in prompts), body.max_tokens, max_model_len, "the prompt", "prompt")
    logprobs = body.logprobs
    echoed = logprobs if body.echo and logprobs is not None else None
    asked = [k for k in (echoed, body.prompt_logprobs) if k is not None]
    prompt_logprobs = max(asked) if asked else None  # echo's logprobs and vLLM's prompt_logprobs, scored once
    # echo with max_tokens=0 scores the prompt and drops the one token generated
    per_prompt = choice_params(
        body, vocab_size, max_tokens=max(wanted, 1), logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar
    )
    return per_prompt * len(prompts)


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


def _logprobs_block(tokenizer, ids: list[int], logprobs: list, tops: list, offsets: list[int], position: int) -> dict:
    """OpenAI's completions `logprobs`: one entry per token (prompt tokens first when echoing).

    Args:
        ids, logprobs, tops: each token's id, logprob and alternatives.
        offsets: where the first tokens (the echoed prompt's) start in the choice's text.
        position: where the token after them starts; each later one starts after the previous one's text.
    """
    texts = token_strings(tokenizer, ids)
    offsets = list(offsets)
    for text in texts[len(offsets) :]:
        offsets.append(position)
        position += len(text)
    top_dicts = [
        None if top is None else _top_dict(tokenizer, token_id, logprob, top)
        for token_id, logprob, top in zip(ids, logprobs, tops)
    ]
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top_dicts, "text_offset": offsets}


def _prompt_offsets(tokenizer, text: str, ids: list[int]) -> list[int]:
    """Where each of `ids` starts in `text`, the prompt as sent (a special token the tokenizer added: where it stands).

    The tokenizer's offset mapping gives them when it reproduces `ids` from `text`; otherwise (a
    tokenizer without offsets) each token starts after the previous one's text.
    """
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True)
        if encoded["input_ids"] == ids:
            return [start for start, _ in encoded["offset_mapping"]]
    offsets, position = [], 0
    for piece in token_strings(tokenizer, ids):
        offsets.append(position)
        position += len(piece)
    return offsets


class _Echo:
    """What echo adds in front of a choice: the prompt as sent, and its tokens' logprobs.

    A text prompt is echoed as it came (not decoded back, which would show the special tokens the
    tokenizer added, e.g. `<s>`); token ids are decoded as they are. With logprobs, each prompt
    token's `text_offset` indexes that text, as OpenAI's do. Built on the thread pool.
    """

    def __init__(self, body: CompletionRequest, tokenizer, prompts: list[list[int]]):
        self.enabled = body.echo
        self.drop_generated = body.echo and body.max_tokens == 0
        self._n = body.n
        self._top_n = body.logprobs or 0
        self._texts: list[str] = []
        self._offsets: list[list[int]] = []
        if not self.enabled:
            return
        if isinstance(body.prompt, str):
            self._texts = [body.prompt]
        elif isinstance(body.prompt[0], str):
            self._texts = list(body.prompt)
        else:
            self._texts = [tokenizer.decode(ids) for ids in prompts]
        if body.logprobs is not None:
            self._offsets = [_prompt_offsets(tokenizer, text, ids) for text, ids in zip(self._texts, prompts)]

    def prompt_text(self, choice: Choice) -> str:
        return self._texts[choice.index // self._n] if self.enabled else ""

    def prompt_offsets(self, choice: Choice) -> list[int]:
        """Where each echoed prompt token starts in the choice's text (none without echo or logprobs)."""
        return self._offsets[choice.index // self._n] if self._offsets else []

    def prompt_scores(self, choice: Choice) -> tuple[list, list]:
        if not self.enabled or choice.prompt_logprobs is None:
            return [], []
        n = self._top_n
        scored = choice.prompt_logprobs
        return [None] + [entry[0] for entry in scored], [None] + [entry[1][:n] for entry in scored]


class CompletionResponder:
    """Completions' wording: `text` (after the echoed prompt) and the `logprobs` block, whole or per chunk."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, body: CompletionRequest, tokenizer, echo: _Echo):
        self._body = body
        self._tokenizer = tokenizer
        self._echo = echo
        # per choice that has started streaming: the text_offset of its next generated token
        self._position: dict[int, int] = {}

    def choice(self, choice: Choice) -> dict:
        echo = self._echo
        block = None
        if self._body.logprobs is not None:
            prompt_lps, prompt_tops = echo.prompt_scores(choice)
            ids = (choice.prompt_ids if echo.enabled else []) + choice.token_ids
            block = _logprobs_block(
                self._tokenizer,
                ids,
                prompt_lps + choice.logprobs,
                prompt_tops + choice.top_logprobs,
                echo.prompt_offsets(choice),
                len(echo.prompt_text(choice)),
            )
        reason = "length" if echo.drop_generated else finish_reason(choice)
        entry = {"index": choice.index, "text": echo.prompt_text(choice) + choice.text, "logprobs": block, "finish_reason": reason}
        if self._body.prompt_logprobs is not None:
            entry["prompt_logprobs"] = prompt_logprobs_json(
                self._tokenizer, choice.prompt_ids, choice.prompt_logprobs or [], self._body.prompt_logprobs
            )
        return entry

    def fields(self, choices: list[Choice]) -> dict:
        return {}

    def opening(self, choice: Choice) -> None:
        return None

    def delta(self, choice: Choice, event: TokenEvent) -> dict | None:
        echo = self._echo
        first = choice.index not in self._position
        position = self._position.setdefault(choice.index, len(echo.prompt_text(choice)))
        offsets: list[int] = []
        text, ids, lps, tops = event.text, [], [], []
        if event.token_id is not None and not echo.drop_generated:
            ids, lps, tops = [event.token_id], [event.logprob], [event.top_logprobs]
        else:
            text = ""
        if first and echo.enabled:
            text = echo.prompt_text(choice) + text
            prompt_lps, prompt_tops = echo.prompt_scores(choice)
            ids, lps, tops = choice.prompt_ids + ids, prompt_lps + lps, prompt_tops + tops
            offsets = echo.prompt_offsets(choice)
        reason = "length" if echo.drop_generated and choice.finish_reason else finish_reason(choice)
        if not text and reason is None and (self._body.logprobs is None or not ids):
            return None
        block = None
        if self._body.logprobs is not None:
            block = _logprobs_block(self._tokenizer, ids, lps, tops, offsets, position)
            if len(ids) > len(offsets):
                self._position[choice.index] = block["text_offset"][-1] + len(block["tokens"][-1])
        return {"index": choice.index, "text": text, "logprobs": block, "finish_reason": reason}


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
    grammar = await run_in_threadpool(requested_grammar, body, tokenizer)  # structured outputs; compiling stays off the loop
    params = _params(body, prompts, svc.engine.max_model_len, svc.engine.vocab_size, grammar)
    echo = await run_in_threadpool(_Echo, body, tokenizer, prompts)
    plan = Plan(prompts, params, CompletionResponder(body, tokenizer, echo), keep_generated=not echo.drop_generated)
    return await respond(svc, principal.tenant, record and record.adapter, body, plan, http_request)

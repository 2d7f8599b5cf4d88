"""vLLM's tokenizer routes: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

Owns: the three routes at the top level, where vLLM places them (lm-evaluation-harness's remote
tokenizer strips `/v1/...` from its base URL to find them), behind the same key checks as every
/v1 route (the gate's `needs_key`). `model` (optional: the base model) names the base model or an
adapter the caller may use, exactly as in generation requests; every adapter shares the base
model's tokenizer, but the chat form renders through the adapter's own chat template when it has
one. Work is bounded as a generation request's is: text by the prompt encoder's length bound, on
the thread pool; token counts by max_model_len (as vLLM bounds them).
"""

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from loraplex.api.auth import caller
from loraplex.api.chat import render_prompt
from loraplex.api.json_body import StrictJsonRoute
from loraplex.api.models import MODEL_NOT_FOUND, resolve_model
from loraplex.api.response_models import Detokenized, Tokenized, TokenizerInfo, errors
from loraplex.api.schemas import DetokenizeRequest, TokenizeRequest
from loraplex.api.services import Services, services
from loraplex.errors import RequestInvalid
from loraplex.tenancy import Principal

router = APIRouter(route_class=StrictJsonRoute)

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _tokenize(body: TokenizeRequest, svc: Services, principal: Principal) -> list[int]:
    record = None if body.model is None else resolve_model(svc, principal, body.model)
    if body.messages is not None:
        return render_prompt(
            body.messages, body.add_generation_prompt, record, svc.prompts, svc.chat_templates, body.special_tokens
        )
    return svc.prompts.encode(body.prompt, "prompt", add_special_tokens=body.special_tokens)


def _within_context(count: int, param: str, max_model_len: int) -> None:
    if count > max_model_len:
        raise RequestInvalid(
            f"{param} holds {count} tokens; this model's maximum context length is {max_model_len}", param=param
        )


def _answers(answer: type, description: str, refused: str) -> dict:
    """The `responses=` of a tokenizer route taking a `model`: `answer`, a 400 when `refused`, the 404."""
    return {200: {"model": answer, "description": description}, **errors({400: refused, 404: MODEL_NOT_FOUND})}


@router.post(
    "/tokenize",
    response_model=None,
    responses=_answers(
        Tokenized,
        "The token ids.",
        "The body is invalid (the message names the field), neither or both of prompt and messages are given, the "
        "chat template fails or is missing, or the text is longer than max_model_len tokens.",
    ),
)
async def tokenize(body: TokenizeRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)) -> dict:
    body.check_supported()
    ids = await run_in_threadpool(_tokenize, body, svc, principal)  # long texts must not stall the loop
    max_model_len = svc.engine.max_model_len
    _within_context(len(ids), "prompt" if body.messages is None else "messages", max_model_len)
    answer = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
    if body.return_token_strs:
        answer["token_strs"] = svc.engine.base.tokenizer.convert_ids_to_tokens(ids)
    return answer


@router.post(
    "/detokenize",
    response_model=None,
    responses=_answers(
        Detokenized,
        "The text.",
        "The body is invalid (the message names the field), a token id is not below the vocabulary size, or there "
        "are more than max_model_len tokens.",
    ),
)
async def detokenize(
    body: DetokenizeRequest, svc: Services = Depends(services), principal: Principal = Depends(caller)
) -> dict:
    if body.model is not None:
        resolve_model(svc, principal, body.model)
    _within_context(len(body.tokens), "tokens", svc.engine.max_model_len)
    vocab_size = svc.engine.vocab_size
    outside = next((token for token in body.tokens if token >= vocab_size), None)
    if outside is not None:
        raise RequestInvalid(f"token id {outside} is not below the vocabulary size ({vocab_size})", param="tokens")
    return {"prompt": await run_in_threadpool(svc.engine.base.tokenizer.decode, body.tokens)}


@router.get("/tokenizer_info", response_model=None, responses={200: {"model": TokenizerInfo, "description": "The tokenizer."}})
def tokenizer_info(svc: Services = Depends(services)) -> dict:
    tokenizer = svc.engine.base.tokenizer
    special = tokenizer.special_tokens_map
    try:
        template = tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else None
    except ValueError:  # named templates without a default
        template = None
    return {
        "tokenizer_class": type(tokenizer).__name__,
        **{name: special.get(name) for name in SPECIAL_TOKENS},
        "chat_template": template,
        "model_max_length": svc.engine.max_model_len,
    }

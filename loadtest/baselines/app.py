"""The FastAPI app of the baseline servers: OpenAI completions served by one `Worker`.

Owns: the routes (`POST /v1/completions`, `GET /v1/models`, `GET /health`), turning a body into a
`Request` only once everything PEFT could fail on mid-batch has been checked (a mixed batch that
raises leaves PEFT misrouting later calls: peft#3475), incremental detokenization, and the
streamed and whole responses. The model runs only on the worker's thread: the event loop never
waits on it, it reads each request's asyncio queue.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from loadtest.baselines.protocol import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    CompletionBody,
    api_error_response,
    choice,
    error_body,
    new_id,
    now,
    sse,
    usage,
    validation_error_response,
)
from loadtest.baselines.request import Request
from loadtest.baselines.worker import Worker


def make_request(body: CompletionBody, worker: Worker, tokenizer: PreTrainedTokenizerBase, served_model_name: str) -> Request:
    """The request `body` asks for, checked against the model so that `generate` cannot fail on it.

    Args:
        body: the parsed completions body.
        worker: the worker that will run it (its adapters, vocabulary, context length and EOS ids).
        tokenizer: the checkpoint's tokenizer, for text prompts.
        served_model_name: the name that selects the base model.

    Raises:
        ApiError: 404 for an unknown model, 400 for anything else the server cannot run.
    """
    body.check_supported()
    if body.model == served_model_name:
        adapter = None
    elif body.model in worker.adapters:
        adapter = body.model
    else:
        raise ApiError(404, f"the model `{body.model}` does not exist", param="model", code="model_not_found")
    prompt = tokenizer(body.prompt)["input_ids"] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if not all(0 <= token_id < worker.vocab_size for token_id in prompt):
        raise ApiError(400, f"prompt token ids must lie in [0, {worker.vocab_size})", param="prompt")
    max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
    if len(prompt) + max_tokens > worker.max_positions:
        raise ApiError(
            400,
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the maximum context length ({worker.max_positions})",
            param="prompt" if len(prompt) >= worker.max_positions else "max_tokens",
        )
    return Request(prompt, adapter, max_tokens, body.ignore_eos, worker.eos_ids, asyncio.get_running_loop())


class Completion:
    """One request's tokens as they come back from the worker, turned into text increments."""

    def __init__(self, request: Request, tokenizer: PreTrainedTokenizerBase):
        self.request = request
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []  # the generated ids that make the text: a stopping EOS is left out
        self.num_generated = 0
        self.text = ""  # the text handed out so far
        self.finish_reason: str | None = None

    async def deltas(self) -> AsyncIterator[str]:
        """The new text of each generated token: all ids decoded, less the text handed out before.

        While the text ends in an incomplete character the delta is "" and the rest waits.

        Raises:
            ApiError: 500 if the generation failed.
        """
        while self.finish_reason is None:
            event = await self.request.events.get()
            if event.finish_reason == "error":
                raise ApiError(500, event.message, code="generation_failed")
            self.num_generated += 1
            self.finish_reason = event.finish_reason
            if event.finish_reason != "stop":
                self.token_ids.append(event.token_id)
            text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            if self.finish_reason is None and text.endswith("\ufffd"):
                yield ""
                continue
            delta, self.text = text[len(self.text) :], text
            yield delta

    def usage(self) -> dict:
        return usage(len(self.request.prompt), self.num_generated)


async def _stream(completion: Completion, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's SSE: a chunk per token, one with the finish reason, usage if asked, then `[DONE]`."""
    try:
        async for delta in completion.deltas():
            yield sse({**head, "choices": [choice(delta, None)]})
    except ApiError as error:
        yield sse(error_body(error.message, code=error.code))
        yield sse("[DONE]")
        return
    yield sse({**head, "choices": [choice("", completion.finish_reason)]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": completion.usage()})
    yield sse("[DONE]")


def _model_card(name: str, parent: str | None, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "peft-baseline", "root": name, "parent": parent}


def create_app(worker: Worker, tokenizer: PreTrainedTokenizerBase, served_model_name: str = "base") -> FastAPI:
    """The baseline server's app; its lifespan starts and stops `worker`.

    Args:
        worker: the naive or mixed worker, not started yet.
        tokenizer: the checkpoint's tokenizer.
        served_model_name: the model name that selects the base model (adapters go by their names).
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="PEFT baseline", lifespan=lifespan)
    app.add_exception_handler(ApiError, api_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        created = now()
        cards = [_model_card(served_model_name, None, created)]
        cards += [_model_card(name, served_model_name, created) for name in worker.adapters]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        request = make_request(body, worker, tokenizer, served_model_name)
        worker.submit(request)
        completion = Completion(request, tokenizer)
        head = {"id": new_id(), "object": "text_completion", "created": now(), "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(completion, head, include_usage), media_type="text/event-stream")
        async for _ in completion.deltas():
            pass
        return {**head, "choices": [choice(completion.text, completion.finish_reason)], "usage": completion.usage()}

    return app

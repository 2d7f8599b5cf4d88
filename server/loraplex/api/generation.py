"""One HTTP generation request as the engine sees it: a group of engine requests, one per choice.

Owns: submitting every choice of a request (prompts x n) to the engine together, refunding the
ones already queued when the queue turns out to be full, merging their token events into one
async stream, cancelling all of them when the client disconnects (streaming or not), and metering
the tenant's tokens when the request ends. Formatting responses is the route modules' job.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request as HttpRequest

from loraplex import errors
from loraplex.api.services import Services
from loraplex.engine.request import FinishReason, SamplingParams, TokenEvent, TopLogprobs
from loraplex.errors import EngineFailed, EngineUnavailable, LoraplexError, RequestInvalid, ServerDraining
from loraplex.lora.adapter import LoraAdapter

# What a generating route's 429 and 503 mean, for its OpenAPI document.
QUEUE_FULL = "The queue is full (--max-queue); retry later."
ENGINE_CUT = "The engine is not running, or the request was cut by an engine failure or a shutdown."


@dataclass
class Choice:
    """One choice's prompt and everything generated for it so far."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    fatal: bool = False  # the error is the engine's own: it stopped
    error_type: str | None = None  # the typed error the engine named (an adapter that could not be read)
    keep_generated: bool = True  # False when only the prompt is scored (echo with max_tokens=0)

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None and self.keep_generated:
            self.token_ids.append(event.token_id)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
                self.top_logprobs.append(event.top_logprobs or [])
            self.text += event.text
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error
            self.fatal = event.fatal
            self.error_type = event.error_type

    def raise_for_outcome(self) -> None:
        """Raise for a choice that did not finish normally (engine failure, shutdown)."""
        if self.finish_reason is FinishReason.ERROR:
            named = getattr(errors, self.error_type or "", None)
            if isinstance(named, type) and issubclass(named, LoraplexError) and not self.fatal:
                raise named(self.error or "the request's adapter could not be served", param="model")
            failure = EngineUnavailable if self.fatal else EngineFailed
            raise failure(self.error or "the engine failed while running this request")
        if self.finish_reason is FinishReason.ABORT:
            raise ServerDraining("the request was aborted because the server is shutting down")


class Generation:
    """The engine requests behind one completions or chat call.

    Args:
        services: the server's engine, metrics and limits.
        tenant: who pays for the tokens.
        adapter: the adapter version every choice runs with (None for the base model).
        prompts: token ids per prompt.
        params: sampling parameters per choice; `len(params)` is a multiple of `len(prompts)`,
            choice `i` runs prompt `i // n`.
        keep_generated: False to score prompts only: generated tokens are neither returned nor metered.
    """

    def __init__(
        self,
        services: Services,
        tenant: str,
        adapter: LoraAdapter | None,
        prompts: list[list[int]],
        params: list[SamplingParams],
        keep_generated: bool = True,
    ):
        self._services = services
        self.tokenizer = services.engine.base.tokenizer
        self._tenant = tenant
        self._adapter = adapter
        n = len(params) // len(prompts)
        self.choices = [Choice(i, prompts[i // n], keep_generated=keep_generated) for i in range(len(params))]
        self._params = params
        self._request_ids: list[str] = []
        self._events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self._unfinished = len(params)
        self._watcher: asyncio.Task | None = None
        self._counted = False  # whether this request is in `services.in_flight`
        self.num_prompt_tokens = sum(len(p) for p in prompts)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)

    def start(self, http_request: HttpRequest) -> None:
        """Queue every choice, or none: a full queue refunds those already queued and raises.

        A request with more choices than the queue holds could never run: that is the caller's
        error (400), not a full queue (429).
        """
        services = self._services
        max_queue = services.engine.config.max_queue
        if max_queue is not None and len(self.choices) > max_queue:
            raise RequestInvalid(
                f"this request has {len(self.choices)} choices (prompts x n); the server queues at most {max_queue} "
                "(--max-queue), so it could never run",
                param="n",
            )
        bridge = services.engine.bridge()
        for choice, params in zip(self.choices, self._params):
            sink = bridge.sink(lambda event, index=choice.index: self._events.put_nowait((index, event)))
            try:
                request_id = services.engine.add_request(choice.prompt_ids, self._adapter, params, sink=sink, tenant=self._tenant)
            except LoraplexError:
                self.cancel()
                raise
            self._request_ids.append(request_id)
        services.in_flight += 1
        self._counted = True
        self._watcher = asyncio.create_task(self._watch_disconnect(http_request))

    async def _watch_disconnect(self, http_request: HttpRequest) -> None:
        while True:
            message = await http_request.receive()
            if message["type"] == "http.disconnect":
                self.cancel()
                return

    def cancel(self) -> None:
        """Abort every choice still running: KV blocks and slot references are freed at once."""
        for request_id in self._request_ids:
            self._services.engine.cancel(request_id)

    async def events(self) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """Every choice's events as they come, each already applied to its `Choice`."""
        while self._unfinished:
            index, event = await self._events.get()
            choice = self.choices[index]
            choice.add(event)
            if event.finish_reason is not None:
                self._unfinished -= 1
            yield choice, event

    async def collect(self) -> list[Choice]:
        """Wait for every choice, meter the tokens, and raise for a choice that failed or was aborted."""
        try:
            async for _ in self.events():
                pass
        finally:
            self.close()
        for choice in self.choices:
            choice.raise_for_outcome()
        return self.choices

    def close(self) -> None:
        """Cancel what is left (a client gone mid-stream) and meter the tenant's tokens."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._unfinished:
            self.cancel()
        if self._counted:
            self._counted = False
            self._services.in_flight -= 1
            self._services.metrics.tenant_tokens(self._tenant, self.num_prompt_tokens, self.num_generated_tokens)

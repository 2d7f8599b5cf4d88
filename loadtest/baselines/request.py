"""One completion request as the baseline workers see it, and the rule that ends it.

Owns: a request's prompt ids, adapter and limits; the stop rule (its own `max_tokens`, or an EOS id
unless it ignores EOS), both per token (`Request.add_token`, on the worker thread) and per batch
(`RowLimits`, inside `generate`); and handing each outcome to the request's asyncio queue from the
worker thread. It knows token ids only: text belongs to the app.
"""

import asyncio
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria


@dataclass(frozen=True)
class Event:
    """One outcome of a request: a generated token, or a failure."""

    token_id: int | None  # None when the request failed
    finish_reason: str | None  # "stop", "length" or "error" on the request's last event
    message: str = ""  # what failed


@dataclass(eq=False)
class Request:
    """A queued or running completion; the worker thread writes to it, the event loop reads `events`."""

    prompt: list[int]
    adapter: str | None  # None for the base model
    max_tokens: int
    ignore_eos: bool
    eos_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_generated: int = 0
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token_id: int) -> None:
        """Record one generated token (nothing once the request is finished) and hand it over.

        Args:
            token_id: the token the request's row of the batch got at this step.
        """
        if self.finished:
            return
        self.num_generated += 1
        if not self.ignore_eos and token_id in self.eos_ids:
            self.finish_reason = "stop"
        elif self.num_generated >= self.max_tokens:
            self.finish_reason = "length"
        self._post(Event(token_id, self.finish_reason))

    def fail(self, message: str) -> None:
        """End the request with an error, unless it is finished already.

        Args:
            message: what went wrong, for the client.
        """
        if self.finished:
            return
        self.finish_reason = "error"
        self._post(Event(None, "error", message))

    def _post(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class RowLimits(StoppingCriteria):
    """`Request.add_token`'s stop rule for every row of a batched `generate` at once."""

    def __init__(self, requests: list[Request], prompt_width: int, device: torch.device):
        self.prompt_width = prompt_width
        self.max_tokens = torch.tensor([r.max_tokens for r in requests], device=device)  # [B]
        self.stops_at_eos = torch.tensor([not r.ignore_eos for r in requests], device=device)  # [B]
        eos_ids = sorted(set().union(*(r.eos_ids for r in requests)))
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long, device=device)  # [E]
        self.longest = max(r.max_tokens for r in requests)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # input_ids: [B, prompt_width + generated]
        generated = input_ids.shape[1] - self.prompt_width
        at_eos = torch.isin(input_ids[:, -1], self.eos_ids) & self.stops_at_eos  # [B]
        return at_eos | (generated >= self.max_tokens)  # [B] bool

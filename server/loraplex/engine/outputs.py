"""What a step's logits become: each request's token events, and the failures that stay its own.

Owns: `LiveRequest` (a running request with its detokenizer and listener) and `OutputProcessor`, which,
for one step, checks every sequence's logits are finite (blaming, by `find_culprits`, the sequences
that break a step alone, and holding back the others to be recomputed), scores prompt logprobs,
masks constrained requests' rows to their grammar's tokens (grammar.py fills the bitmask), applies
each request's logits controls (penalties, logit_bias, min_tokens), samples, advances each grammar
with its token (a complete grammar ends the request with `stop`), detokenizes, applies stop tokens,
stop strings and length limits, and hands each request its `TokenEvent`. An
error in one request's share fails that request alone, with an error event naming it. Scheduling and
freeing a finished request are the engine's: it is told through `finish`. It never runs the model
except to diagnose a broken step.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.engine.culprits import find_culprits
from loraplex.engine.detokenizer import Detokenizer
from loraplex.engine.grammar import GrammarMatchers
from loraplex.engine.request import FinishReason, Request, TokenEvent
from loraplex.engine.runner import LogitRows, ModelRunner
from loraplex.engine.sampling import apply_controls, apply_token_bitmask, sample, token_logprobs, token_ranks
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.engine.step_inputs import to_device
from loraplex.engine.stream import Sink

log = logging.getLogger(__name__)

@dataclass(eq=False)
class LiveRequest:
    """A request the engine holds: its state, its text so far, and who listens."""

    request: Request
    detokenizer: Detokenizer
    sink: Sink


class OutputProcessor:
    """Turns each step's logits into events, request by request.

    Args:
        runner: runs a sequence alone when a step must be diagnosed.
        null_slot: the all-zero LoRA slot.
        eos_ids: the model's end-of-sequence tokens.
        max_model_len: prompt plus output tokens of one sequence.
        raw_logits: logprobs carry the raw logits (`logprobs_mode = raw_logits`).
        live: the engine's requests by id (shared: the engine adds them, `finish` removes them).
        finish: ends a request with a reason (frees its KV blocks and slot, counts it).
        observe_token: told of every generated token and the gap since the request's previous one.
        grammars: fills the bitmasks of constrained requests (those with a matcher).
    """

    def __init__(
        self,
        runner: ModelRunner,
        null_slot: int,
        eos_ids: set[int],
        max_model_len: int,
        raw_logits: bool,
        live: dict[str, LiveRequest],
        finish: Callable[[Request, FinishReason], None],
        observe_token: Callable[[Request, float | None], None],
        grammars: GrammarMatchers,
    ):
        self._grammars = grammars
        self._runner = runner
        self._null_slot = null_slot
        self._eos_ids = eos_ids
        self._max_model_len = max_model_len
        self._raw_logits = raw_logits
        self._live = live
        self._finish = finish
        self._observe_token = observe_token
        self.failures = 0  # requests failed since the engine last reset the count
        self.last_failure = ""

    def process(self, batch: list[ScheduledSeq], logits: torch.Tensor, rows: LogitRows) -> None:
        """Check, score, sample and emit each sequence's share of the step's logits."""
        sampled = sorted(rows.sample_rows.items())
        requests = [batch[index].request for index, _ in sampled]
        tokens = torch.empty(0, dtype=torch.long, device=logits.device)
        (picked_rows,) = to_device([[row for _, row in sampled]], torch.long, logits.device)
        if sampled:
            tokens = self._sample(logits.index_select(0, picked_rows), requests)
        # A row with a NaN or Inf has a non-finite sum; one sum per row is 20x cheaper than a
        # check per element, and the rare finite row whose sum overflows is checked again below.
        finite = torch.isfinite(logits.sum(dim=-1))  # [R]
        # The step's one read from the device: the sampled ids, then whether each logits row is finite.
        read = torch.cat([tokens, finite.long()]).tolist()
        token_ids, finite_rows = read[: len(sampled)], read[len(sampled) :]
        if not all(finite_rows):
            finite_rows = [ok or bool(torch.isfinite(logits[row]).all()) for row, ok in enumerate(finite_rows)]
        broken = [seq for index, seq in enumerate(batch) if not all(finite_rows[row] for row in rows.rows_of(index))]
        if broken:
            self.blame(broken, "its logits are not finite (NaN or Inf)")
        held = {id(seq.request) for seq in broken}  # failed now, or to be recomputed next step
        for seq in batch:
            if id(seq.request) not in held:
                seq.request.num_computed = seq.start + seq.length
        wants_logprobs = any(r.params.logprobs is not None for r in requests)
        scores = None
        if rows.prompt_rows or wants_logprobs:
            scores = logits if self._raw_logits else logits.log_softmax(dim=-1)
        for index, (row, count) in rows.prompt_rows.items():
            request = batch[index].request
            if id(request) not in held and not request.finished:
                self._guarded(request, lambda: self._score_prompt(request, scores[row : row + count]))
        chosen, top = [None] * len(requests), [None] * len(requests)
        if wants_logprobs:
            top_n = max((r.params.logprobs or 0) for r in requests)
            chosen, top = token_logprobs(scores.index_select(0, picked_rows), tokens, top_n)
        for request, token, logprob, alternatives in zip(requests, token_ids, chosen, top):
            if id(request) in held or request.finished:
                continue
            n = request.params.logprobs
            kept = (logprob, alternatives[:n]) if n is not None else (None, None)
            self._guarded(request, lambda: self._append_token(request, token, *kept))
        self._grammars.prefetch(requests)  # the next step's masks, computed while its forward pass runs

    def blame(self, seqs: list[ScheduledSeq], problem: str) -> None:
        """Fail the sequences that break a step alone.

        If none breaks alone, the breakage needs them together: all of them are failed with
        `problem`, rather than retried forever.
        """
        culprits = find_culprits(self._runner, seqs, self._null_slot) or [(seq.request, problem) for seq in seqs]
        for request, reason in culprits:
            adapter = f" (adapter {request.adapter.name!r})" if request.adapter is not None else ""
            self.fail(request, f"the engine could not run request {request.request_id}{adapter}: {reason}")

    def fail(self, request: Request, message: str, fatal: bool = False, error_type: str | None = None) -> None:
        """End `request` with an error event naming `message` (once; a finished request is left alone)."""
        if request.finished:
            return
        self.failures += 1
        self.last_failure = message
        live = self._live.get(request.request_id)
        self._finish(request, FinishReason.ERROR)
        if live is not None:
            event = TokenEvent(
                request.request_id, None, "", finish_reason=FinishReason.ERROR, error=message, fatal=fatal, error_type=error_type
            )
            try:
                live.sink(event)
            except Exception:  # a listener that cannot take the error cannot take anything else either
                log.exception("could not deliver the error of request %s", request.request_id)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Sample every row at once; if that fails, row by row, failing only the rows that fail.

        Logprobs are scored on the raw logits (`logprobs_mode`), before a grammar or any control changed them.
        """
        try:
            controlled = apply_controls(self._mask_grammars(logits, requests), requests, self._eos_ids)
            return sample(controlled, [r.params for r in requests], [r.generator for r in requests])
        except Exception:
            log.exception("sampling a step failed; sampling its %d rows one by one", len(requests))
        picked = []
        for row, request in enumerate(requests):
            try:
                masked = self._mask_grammars(logits[row : row + 1], [request])
                controlled = apply_controls(masked, [request], self._eos_ids)
                picked.append(sample(controlled, [request.params], [request.generator]))
            except Exception as exc:
                self.fail(request, f"sampling request {request.request_id} failed: {type(exc).__name__}: {exc}")
                picked.append(torch.zeros(1, dtype=torch.long, device=logits.device))
        return torch.cat(picked)

    def _mask_grammars(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """`logits` ([N, V]) with each constrained row masked to its grammar's tokens; itself when none is constrained."""
        constrained = [i for i, r in enumerate(requests) if r.matcher is not None]
        if not constrained:
            return logits
        bitmask = self._grammars.fill_bitmask([requests[i] for i in constrained])  # [M, W] int32, CPU
        (rows,) = to_device([constrained], torch.long, logits.device)
        return apply_token_bitmask(logits, rows, bitmask.to(logits.device))

    def _guarded(self, request: Request, work: Callable[[], None]) -> None:
        """Run one request's share of post-processing; an error fails that request only."""
        try:
            work()
        except Exception as exc:
            log.exception("post-processing request %s failed", request.request_id)
            self.fail(request, f"request {request.request_id} failed: {type(exc).__name__}: {exc}")

    def _score_prompt(self, request: Request, scores: torch.Tensor) -> None:
        first = len(request.prompt_logprobs)
        (targets,) = to_device([request.prompt_ids[first + 1 : first + 1 + scores.shape[0]]], torch.long, scores.device)
        chosen, top = token_logprobs(scores, targets, request.params.prompt_logprobs)
        request.prompt_logprobs.extend(zip(chosen, top, token_ranks(scores, targets)))

    def _append_token(self, request: Request, token: int, logprob, alternatives) -> None:
        live = self._live[request.request_id]
        now = time.monotonic()
        gap = None if request.last_token_time is None else now - request.last_token_time
        request.first_token_time = request.first_token_time or now
        request.last_token_time = now
        complete = request.matcher is not None and self._grammars.advance(request, token)
        request.output_ids.append(token)
        params = request.params
        finish = None
        text = ""
        if token in params.stop_token_ids or (token in self._eos_ids and not params.ignore_eos):
            finish = FinishReason.STOP
            if params.include_stop_str_in_output:
                text = live.detokenizer.add(token).text
        else:
            delta = live.detokenizer.add(token)
            text = delta.text
            if delta.stopped:
                finish = FinishReason.STOP
        if finish is None and complete:
            finish = FinishReason.STOP
        if finish is None and (len(request.output_ids) >= params.max_tokens or request.num_tokens >= self._max_model_len):
            finish = FinishReason.LENGTH
        self._observe_token(request, gap)
        event = TokenEvent(request.request_id, token, text, logprob, alternatives)
        if len(request.output_ids) == 1 and request.prompt_logprobs is not None:
            event.prompt_logprobs = list(request.prompt_logprobs)
        if finish is not None:
            event.text += live.detokenizer.flush()
            event.finish_reason = finish
            self._finish(request, finish)
        live.sink(event)

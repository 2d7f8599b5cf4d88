"""One generation request: what was asked, and where it stands.

Owns: `SamplingParams` (validated at construction), the engine's per-request state (`Request`),
and what the engine hands back (`TokenEvent` per token, `Completion` for a whole request). The
scheduler moves requests between states; the engine appends tokens; nothing here does either.
"""

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from loraplex.errors import RequestInvalid
from loraplex.lora.adapter import LoraAdapter
from loraplex.tenancy import DEFAULT_TENANT

GREEDY_TEMPERATURE = 1e-5  # below it, sampling is greedy (vLLM draws the same line)
MAX_PENALTY = 2.0  # presence and frequency penalties, as OpenAI bounds them
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on one token's bias
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's bound on the tokens one request may bias
MAX_GRAMMAR_CHARS = 1 << 20  # an llguidance grammar string; the API's own bounds on what it is built from are tighter


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS or stop token, or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed while running it


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Every field is checked when the params are built, so nothing a request asks for can fail a
    step later (a seed of any size is reduced to the generator's 64 bits; a top_k beyond the
    vocabulary keeps all tokens).

    Args:
        max_tokens: tokens to generate at most.
        temperature: 0 means greedy; so does anything below GREEDY_TEMPERATURE, where dividing the
            logits by it would overflow to inf and give NaN probabilities.
        top_p: nucleus sampling mass, in (0, 1].
        top_k: keep the k most likely tokens; 0 keeps all.
        seed: makes sampling reproducible for this request, whatever shares its steps.
        stop_token_ids: extra token ids that end generation.
        stop: strings that end generation; the text stops before them.
        ignore_eos: keep going past the model's EOS token.
        logprobs: return each generated token's logprob and this many top alternatives.
        prompt_logprobs: return each prompt token's logprob, its rank and this many top alternatives.
        presence_penalty: subtracted from the logit of every token already generated, in [-2, 2].
        frequency_penalty: subtracted once per time a token was already generated, in [-2, 2].
        repetition_penalty: vLLM's: above 1, a token seen in the prompt or the output has a positive
            logit divided by it and a negative one multiplied by it; in (0, 10].
        logit_bias: (token id, bias in [-100, 100]) pairs added to the logits, at most 300; a dict
            or pairs as lists are taken and stored as sorted pairs.
        min_p: drop tokens less likely than min_p times the most likely one, in [0, 1].
        min_tokens: the EOS and stop tokens cannot be picked before this many tokens are generated.
        include_stop_str_in_output: the text keeps the stop string (or stop token) that ended it.
        skip_special_tokens: leave special tokens out of the text.
        grammar: an llguidance grammar string (api/structured_output.py builds and validates it):
            only tokens it allows are sampled, EOS only where it accepts, and the request ends
            with `stop` once it is complete. None leaves the output unconstrained.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    grammar: str | None = None

    def __post_init__(self) -> None:
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise RequestInvalid(f"{name} must be true or false, got {getattr(self, name)!r}", param=name)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RequestInvalid(f"{name} must be a finite number, got {value!r}", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if abs(getattr(self, name)) > MAX_PENALTY:
                raise RequestInvalid(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if not (0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise RequestInvalid(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        if not (0 <= self.min_p <= 1):
            raise RequestInvalid(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise RequestInvalid(f"min_tokens must be an integer, got {self.min_tokens!r}", param="min_tokens")
        if isinstance(self.max_tokens, int) and not (0 <= self.min_tokens <= self.max_tokens):
            raise RequestInvalid(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}", param="min_tokens"
            )
        object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        for name in ("max_tokens", "top_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise RequestInvalid(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestInvalid(f"seed must be an integer, got {self.seed!r}")
        if self.max_tokens < 1:
            raise RequestInvalid(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestInvalid(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise RequestInvalid(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestInvalid(f"top_k must be >= 0, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RequestInvalid(f"{name} must be >= 0, got {value}")
        if self.grammar is not None and (
            not isinstance(self.grammar, str) or not self.grammar or len(self.grammar) > MAX_GRAMMAR_CHARS
        ):
            raise RequestInvalid(
                f"grammar must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters", param="grammar"
            )
        if any(not s for s in self.stop):
            raise RequestInvalid("stop strings must not be empty")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise RequestInvalid(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Whether the logits depend on the tokens seen so far (any penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def controls_logits(self) -> bool:
        """Whether anything changes the logits before temperature (penalties, bias, min_tokens)."""
        return self.penalised or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def generator_seed(self) -> int | None:
        """The seed as torch.Generator takes it: any integer, reduced to 64 bits."""
        return None if self.seed is None else self.seed % (1 << 64)


def _checked_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """`bias` (a dict, or (token id, bias) pairs) as sorted pairs, or RequestInvalid naming logit_bias."""
    try:
        pairs = list(bias.items()) if isinstance(bias, dict) else [tuple(pair) for pair in bias]
    except TypeError:
        raise RequestInvalid(f"logit_bias must map token ids to biases, got {bias!r}", param="logit_bias") from None
    if len(pairs) > MAX_LOGIT_BIAS_TOKENS:
        raise RequestInvalid(
            f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(pairs)}", param="logit_bias"
        )
    checked = {}
    for pair in pairs:
        if len(pair) != 2:
            raise RequestInvalid(f"logit_bias entries must be (token id, bias) pairs, got {pair!r}", param="logit_bias")
        token, value = pair
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise RequestInvalid(f"logit_bias keys must be token ids >= 0, got {token!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RequestInvalid(f"logit_bias values must be finite numbers, got {value!r}", param="logit_bias")
        if abs(value) > MAX_LOGIT_BIAS:
            raise RequestInvalid(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        checked[token] = float(value)
    return tuple(sorted(checked.items()))


TopLogprobs = list[tuple[int, float]]
PromptLogprob = tuple[float, TopLogprobs, int]  # a prompt token's logprob, best alternatives, and rank (1: the best)


def check_prompt(prompt_ids, max_model_len: int, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, or RequestInvalid naming why the engine cannot run it."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise RequestInvalid("the prompt is empty", param="prompt")
    if len(prompt_ids) >= max_model_len:
        raise RequestInvalid(
            f"the prompt has {len(prompt_ids)} tokens; max_model_len is {max_model_len}, which leaves no room to generate",
            param="prompt",
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise RequestInvalid(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    return prompt_ids


@dataclass
class TokenEvent:
    """One generated token, streamed as soon as it is sampled.

    `text` is the new text this token completes (possibly empty while a multi-byte character or a
    possible stop string is held back). The last event of a request carries `finish_reason`.
    """

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[PromptLogprob] | None = None  # from the prompt's second token on
    error: str | None = None
    fatal: bool = False  # with an error: the engine itself stopped, not just this request
    error_type: str | None = None  # with an error: the `LoraplexError` class that says what (e.g. AdapterInvalid)


@dataclass
class Completion:
    """A finished request, as the synchronous API returns it."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob] | None = None  # from the prompt's second token on

    @classmethod
    def from_events(cls, events: list[TokenEvent], prompt_ids: list[int]) -> "Completion":
        """Gather one request's streamed events (the last carries the finish reason)."""
        tokens = [e for e in events if e.token_id is not None]
        return cls(
            request_id=events[-1].request_id,
            prompt_ids=prompt_ids,
            output_ids=[e.token_id for e in tokens],
            text="".join(e.text for e in events),
            finish_reason=events[-1].finish_reason,
            logprobs=[e.logprob for e in tokens if e.logprob is not None],
            top_logprobs=[e.top_logprobs for e in tokens if e.top_logprobs is not None],
            prompt_logprobs=next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None),
        )


@dataclass(eq=False)
class Request:
    """The engine's state of one request; owned by the engine thread."""

    request_id: str
    prompt_ids: list[int]
    adapter: LoraAdapter | None
    params: SamplingParams
    generator: torch.Generator | None = None
    tenant: str = DEFAULT_TENANT  # who is served: what the fair scheduler counts service by
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    slot: int | None = None  # LoRA slot while running with an adapter
    slot_bypassed: int = 0  # later adapter requests admitted while this one waited for a slot
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[PromptLogprob] | None = None  # scored so far, when asked for
    token_counts: object = None  # sampling.TokenCounts, built on the first step a penalty needs it
    matcher: object = None  # llguidance.LLMatcher of a constrained request, once grammar.py built it
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

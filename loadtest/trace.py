"""The workload of a load-test run: which requests, for which adapters, sent when.

Owns: `TraceConfig` and `build_trace`, which turn a seed into a list of `RequestSpec`s:
S-LoRA's power-law adapter popularity (adapter i drawn with probability proportional to
(i + 1) ** -alpha, so alpha = 0 is uniform and alpha = 1 skewed), gamma-distributed
inter-arrival gaps with a chosen mean rate and coefficient of variation (cv = 1 is a Poisson
process, cv > 1 bursty), prompt and output lengths drawn uniformly from ranges, and prompts either
as random token ids or read from a JSONL file. It must not send anything.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TraceConfig:
    """How to draw a trace.

    Args:
        num_requests: requests in the trace (the run's count bound).
        adapters: the adapter names to spread requests over, most popular first; empty means
            every request goes to `base_model`.
        base_model: the `model` name of the base model.
        alpha: power-law exponent of adapter popularity.
        rate: mean arrivals per second; None for a closed loop (no arrival times).
        cv: coefficient of variation of the inter-arrival gaps.
        prompt_len: (min, max) prompt tokens for random prompts, inclusive.
        output_len: (min, max) tokens to generate, inclusive.
        token_ids: [low, high) range random prompt token ids are drawn from.
        prompts_file: a JSONL file of prompts; each line is a string or an object with `prompt` and
            optionally `max_tokens`. Lines are used in order, cycling.
        seed: seeds every draw.
    """

    num_requests: int
    adapters: tuple[str, ...] = ()
    base_model: str = "base"
    alpha: float = 1.0
    rate: float | None = None
    cv: float = 1.0
    prompt_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (16, 64)
    token_ids: tuple[int, int] = (10, 256)
    prompts_file: Path | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_len", "output_len", "token_ids"):
            low, high = getattr(self, name)
            if low < 0 or high < low:
                raise ValueError(f"{name} must be a range with 0 <= low <= high, got {low}:{high}")
        if self.token_ids[1] == self.token_ids[0]:
            raise ValueError("token_ids must be a non-empty range low:high with high > low")
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.cv <= 0:
            raise ValueError("cv must be positive")


@dataclass(frozen=True)
class RequestSpec:
    """One request of the trace.

    Args:
        index: position in the trace.
        arrival: seconds after the run's start at which to send it (0 in a closed loop).
        model: the adapter (or base model) name to send as `model`.
        prompt: text, or token ids.
        prompt_tokens: the prompt's length in tokens when known (token-id prompts), else 0.
        max_tokens: tokens to generate.
    """

    index: int
    arrival: float
    model: str
    prompt: str | list[int]
    prompt_tokens: int
    max_tokens: int


def popularity(num_adapters: int, alpha: float) -> np.ndarray:
    """Probability of each adapter, proportional to (rank + 1) ** -alpha; sums to 1."""
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def arrival_times(count: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Offsets of `count` arrivals whose gaps are gamma with mean 1 / rate and the given cv."""
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=count)  # mean shape * scale = 1 / rate
    return np.cumsum(gaps) - gaps[0]  # the first request goes out at once


def read_prompts(path: Path) -> list[tuple[str, int | None]]:
    """(prompt, max_tokens or None) of each non-empty line of a JSONL file."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, str):
            prompts.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append((item["prompt"], item.get("max_tokens")))
        else:
            raise ValueError(f"{path}:{number}: expected a string or an object with a string 'prompt'")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def build_trace(config: TraceConfig) -> list[RequestSpec]:
    """The trace's requests, in sending order; the same config always gives the same trace.

    Adapters, arrivals, lengths and prompts come from separate streams of the seed, so traces that
    differ only in their adapters (or rate) share their prompts and lengths: a base-only run and
    an N-adapter run ask for exactly the same tokens.
    """
    adapter_rng, arrival_rng, length_rng, prompt_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(config.seed).spawn(4)
    )
    count = config.num_requests
    if config.adapters:
        picks = adapter_rng.choice(len(config.adapters), size=count, p=popularity(len(config.adapters), config.alpha))
        models = [config.adapters[pick] for pick in picks]
    else:
        models = [config.base_model] * count
    arrivals = arrival_times(count, config.rate, config.cv, arrival_rng) if config.rate is not None else np.zeros(count)
    output_lens = length_rng.integers(config.output_len[0], config.output_len[1] + 1, size=count)
    file_prompts = read_prompts(config.prompts_file) if config.prompts_file is not None else None
    specs = []
    for index in range(count):
        max_tokens = int(output_lens[index])
        if file_prompts is not None:
            prompt, file_max_tokens = file_prompts[index % len(file_prompts)]
            prompt_tokens = 0
            max_tokens = file_max_tokens if file_max_tokens is not None else max_tokens
        else:
            prompt_tokens = int(length_rng.integers(config.prompt_len[0], config.prompt_len[1] + 1))
            prompt = prompt_rng.integers(config.token_ids[0], config.token_ids[1], size=max(prompt_tokens, 1)).tolist()
            prompt_tokens = len(prompt)
        specs.append(RequestSpec(index, float(arrivals[index]), models[index], prompt, prompt_tokens, max_tokens))
    return specs

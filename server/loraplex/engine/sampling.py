"""Turning a step's logits into tokens and logprobs: small pure functions over tensors.

Owns: the logits controls (min_tokens masking, logit_bias, repetition, frequency and presence
penalties, in vLLM's order), greedy, temperature, min-p, top-k and top-p sampling with
per-request generators (so a seeded request draws the same tokens whatever shares its step), and
logprob extraction. Every control is one tensor op over the step's [N, V] rows, each row with its
own values; Python only loops over a step's requests to build small index tensors. Rows that ask
for no control are never touched (a step with none does no extra work at all).

The penalties need each request's token counts. They live on the device, one `TokenCounts` per
penalised request ([V] generated-token counts and a [V] prompt mask), built once from its ids on
the first step that needs them and then caught up with the tokens appended since (normally one
per step). Rebuilding an [N, V] count tensor from every output id each step would cost O(output
length) Python and host-to-device copying per request per step; the kept counts cost one small
scatter per request per step and V int32s of memory per penalised request. The function holds no
other state; counts stay correct across preemption because output ids never shrink.

Grammars (structured outputs) reach the sampler as a packed bitmask of the constrained rows,
which grammar.py fills; `apply_token_bitmask` unpacks it on the device and sets every other
token's logit to -inf, before the controls, so greedy and sampled requests, penalties and
logit_bias all pick among the grammar's tokens alone. Logprobs stay the raw model's.
"""

import functools
from dataclasses import dataclass

import torch

from loraplex.engine.request import Request, SamplingParams, TopLogprobs
from loraplex.engine.step_inputs import to_device


@dataclass(eq=False)
class TokenCounts:
    """One request's tokens so far, on the device, for its penalties.

    Args:
        output: [V] int32, times each token was generated.
        prompt: [V] bool, whether each token is in the prompt.
        counted: output tokens counted in `output`.
    """

    output: torch.Tensor
    prompt: torch.Tensor
    counted: int

    @classmethod
    def of(cls, prompt_ids: list[int], vocab: int, device: torch.device) -> "TokenCounts":
        (ids,) = to_device([[t for t in prompt_ids if t < vocab]], torch.long, device)
        prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        prompt[ids] = True
        return cls(torch.zeros(vocab, dtype=torch.int32, device=device), prompt, 0)

    def catch_up(self, output_ids: list[int]) -> None:
        """Count the output tokens appended since the last call."""
        new = [t for t in output_ids[self.counted :] if t < self.output.shape[0]]
        self.counted = len(output_ids)
        if new:
            (ids,) = to_device([new], torch.long, self.output.device)
            self.output.index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens, then frequency and presence over output tokens.

    Args:
        logits: [M, V] logits.
        output_counts: [M, V] int, times each token was generated.
        prompt_mask: [M, V] bool, tokens of the prompt.
        repetition: [M] float > 0; 1 is none.
        frequency: [M] float; 0 is none.
        presence: [M] float; 0 is none.
    """
    seen = prompt_mask | (output_counts > 0)  # [M, V]
    scale = torch.where(logits > 0, 1 / repetition[:, None], repetition[:, None])  # [M, V]
    logits = torch.where(seen, logits * scale, logits)
    counts = output_counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add `bias[j]` to `logits[rows[j], ids[j]]` for every entry j.

    Args:
        logits: [M, V].
        rows, ids: [E] long, where each bias goes.
        bias: [E], the biases.
    """
    return logits.index_put((rows, ids), bias.to(logits.dtype), accumulate=True)


def mask_tokens(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set `logits[rows[j], ids[j]]` to -inf for every entry j (rows and ids: [E] long)."""
    return logits.index_put((rows, ids), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


@functools.cache
def _bit_biases(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: entry (b, j) is 0 when bit j of byte b is set, else -inf (a constant, made once per dtype and device)."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return torch.zeros(256, 8, dtype=dtype, device=device).masked_fill_(bits == 0, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with every token a row's bitmask does not allow set to -inf; other rows are unchanged.

    The bitmask is unpacked a byte at a time through a [256, 8] table of additive biases (0 for an
    allowed token, -inf for a refused one), one embedding lookup: five times faster on a CPU than
    shifting out the bits and `masked_fill`, and exact (x + 0 is x). Bytes are read little-endian,
    as llguidance writes them on every platform torch runs on.

    Args:
        logits: [N, V] logits.
        rows: [M] long, the constrained rows.
        bitmask: [M, W] int32 on `logits`' device: bit j of word w allows token 32 * w + j. Tokens
            past 32 * W (a model vocabulary larger than its tokenizer's) are never allowed.

    Returns:
        [N, V], a new tensor.
    """
    vocab = logits.shape[-1]
    table = _bit_biases(logits.dtype, logits.device)
    bias = torch.nn.functional.embedding(bitmask.view(torch.uint8).long(), table).flatten(1)  # [M, 32 W]
    if bias.shape[1] < vocab:
        bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[1]), value=float("-inf"))  # the rest refused
    constrained = logits.index_select(0, rows) + bias[:, :vocab]  # [M, V]
    return logits.index_copy(0, rows, constrained)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below `min_p` times the row's highest (logits: [M, V]; min_p: [M])."""
    probs = logits.softmax(dim=-1)
    floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]  # [M, 1]
    return logits.masked_fill(probs < floor, float("-inf"))


def apply_controls(logits: torch.Tensor, requests: list[Request], eos_ids: set[int]) -> torch.Tensor:
    """The logits after each request's min_tokens mask, logit_bias and penalties; `logits` itself is unchanged.

    Args:
        logits: [N, V] raw logits, one row per request.
        requests: each row's request (its params, prompt and output so far).
        eos_ids: the model's end-of-sequence tokens, masked with the stop tokens before min_tokens.

    Returns:
        [N, V] logits; `logits` itself when no request asks for a control.
    """
    controlled = [i for i, r in enumerate(requests) if r.params.controls_logits]
    if not controlled:
        return logits
    vocab, device = logits.shape[-1], logits.device
    mask_rows, mask_ids, bias_rows, bias_ids, biases = [], [], [], [], []
    for j, i in enumerate(controlled):
        params = requests[i].params
        if len(requests[i].output_ids) < params.min_tokens:
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
            stops = sorted(t for t in stops if t < vocab)
            mask_rows += [j] * len(stops)
            mask_ids += stops
        kept = [(t, b) for t, b in params.logit_bias if t < vocab]
        bias_rows += [j] * len(kept)
        bias_ids += [t for t, _ in kept]
        biases += [b for _, b in kept]
    (index,) = to_device([controlled], torch.long, device)
    rows = logits.index_select(0, index)  # [M, V]
    if mask_ids:
        rows = mask_tokens(rows, *to_device((mask_rows, mask_ids), torch.long, device))
    if biases:
        (bias,) = to_device([biases], logits.dtype, device)
        rows = apply_logit_bias(rows, *to_device((bias_rows, bias_ids), torch.long, device), bias)
    penalised = [j for j, i in enumerate(controlled) if requests[i].params.penalised]
    if penalised:
        counts = []
        for j in penalised:
            request = requests[controlled[j]]
            if request.token_counts is None:
                request.token_counts = TokenCounts.of(request.prompt_ids, vocab, device)
            request.token_counts.catch_up(request.output_ids)
            counts.append(request.token_counts)
        chosen = [requests[controlled[j]].params for j in penalised]
        repetition, frequency, presence = to_device(
            (
                [p.repetition_penalty for p in chosen],
                [p.frequency_penalty for p in chosen],
                [p.presence_penalty for p in chosen],
            ),
            logits.dtype,
            device,
        )
        (where,) = to_device([penalised], torch.long, device)
        penalties = apply_penalties(
            rows.index_select(0, where),
            torch.stack([c.output for c in counts]),
            torch.stack([c.prompt for c in counts]),
            repetition,
            frequency,
            presence,
        )
        rows = rows.index_copy(0, where, penalties)
    return logits.index_copy(0, index, rows)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf.

    Args:
        logits: [N, V] temperature-scaled logits.
        top_k: [N] long, 0 meaning no limit.
        top_p: [N] float in (0, 1].
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: [N, V] raw logits, float32.
        params: each row's sampling parameters.
        generators: each row's random generator (unused for greedy rows).

    Returns:
        [N] long token ids.
    """
    tokens = logits.max(dim=-1).indices  # [N] greedy picks: argmax's first maximum, in half its time on CPU
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return tokens
    vocab = logits.shape[-1]
    index, top_k = to_device((random_rows, [min(params[i].top_k, vocab) for i in random_rows]), torch.long, logits.device)
    temperature, top_p = to_device(
        ([params[i].temperature for i in random_rows], [params[i].top_p for i in random_rows]), logits.dtype, logits.device
    )
    rows = logits.index_select(0, index)  # [M, V]
    rows = rows / temperature[:, None]
    if any(params[i].min_p > 0 for i in random_rows):
        (min_p,) = to_device([[params[i].min_p for i in random_rows]], logits.dtype, logits.device)
        rows = apply_min_p(rows, min_p)
    if any(0 < params[i].top_k < vocab or params[i].top_p < 1 for i in random_rows):
        rows = apply_top_k_top_p(rows, top_k, top_p)
    probs = rows.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per request.
    noise = torch.stack(
        [torch.empty_like(probs[j]).exponential_(generator=generators[i]) for j, i in enumerate(random_rows)]
    )
    tokens[index] = (probs / noise).argmax(dim=-1)
    return tokens


def token_logprobs(
    scores: torch.Tensor, chosen: torch.Tensor, top_n: int
) -> tuple[list[float], list[TopLogprobs]]:
    """Each row's score of its chosen token and its `top_n` best alternatives.

    Args:
        scores: [N, V] log-probabilities (or raw logits, in `raw_logits` mode).
        chosen: [N] token ids.
        top_n: alternatives per row; 0 returns empty lists.
    """
    picked = scores.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    if top_n == 0:
        return picked, [[] for _ in picked]
    values, ids = scores.topk(min(top_n, scores.shape[-1]), dim=-1)
    top = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return picked, top


def token_ranks(scores: torch.Tensor, chosen: torch.Tensor) -> list[int]:
    """Each row's rank of its chosen token: 1 plus the tokens scoring strictly higher (vLLM's `rank`).

    Args:
        scores: [N, V] log-probabilities (or raw logits).
        chosen: [N] token ids.
    """
    picked = scores.gather(-1, chosen[:, None])  # [N, 1]
    return ((scores > picked).sum(dim=-1) + 1).tolist()

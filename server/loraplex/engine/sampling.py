"""Turning a step's logits into tokens and logprobs: small pure functions over tensors.

Owns: greedy, temperature, top-k and top-p sampling with per-request generators (so a seeded
request draws the same tokens whatever shares its step), and logprob extraction. It holds no
state; the engine passes each row's params and generator.
"""

import torch

from loraplex.engine.request import SamplingParams, TopLogprobs
from loraplex.engine.step_inputs import to_device


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

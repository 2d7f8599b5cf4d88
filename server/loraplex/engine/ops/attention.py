"""Attention over the paged KV cache for a step that mixes prefill chunks and decodes.

Owns: the step's attention metadata (where each new token's K/V is written, and for each group of
sequences, which cache slots form their context and what each query may see) and the attention
op itself, in pure PyTorch on top of `scaled_dot_product_attention`. Decodes (one query each) and
prefill chunks (many queries) go in separate groups so that neither pads to the other's shape.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended together, padded to `num_queries` queries and `num_keys` keys."""

    tokens: torch.Tensor  # [n] indices of this group's queries in the step's flat token order
    rows: torch.Tensor  # [n] their rows in the padded [num_seqs * num_queries] layout
    num_seqs: int
    num_queries: int
    block_tables: torch.Tensor  # [num_seqs, num_blocks] cache block of each block of context (padding: block 0)
    num_keys: int  # context positions attended: the longest sequence's
    mask: torch.Tensor  # [num_seqs, 1, num_queries, num_keys] bool, True where a query may attend
    sliding_mask: torch.Tensor | None  # the same with the sliding window applied, when one matters
    in_order: bool  # tokens == rows == arange(n): no scatter needed


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] flat cache slot where each new token's K and V go
    groups: list[AttentionGroup]
    block_size: int  # cache slots per block: slot s is position s % block_size of block s // block_size


@dataclass
class SeqSpan:
    """One sequence's share of a step: queries at positions [start, start + length)."""

    token_offset: int  # where its tokens start in the step's flat order
    start: int
    length: int
    block_table: list[int]  # KV blocks holding positions 0 .. start + length - 1


def _build_group(
    spans: list[SeqSpan], block_size: int, sliding_window: int | None, device: torch.device
) -> AttentionGroup:
    num_queries = max(span.length for span in spans)
    num_keys = max(span.start + span.length for span in spans)
    num_blocks = -(-num_keys // block_size)
    tables, tokens, rows = [], [], []
    for i, span in enumerate(spans):
        used = -(-(span.start + span.length) // block_size)
        tables.append(span.block_table[:used] + [0] * (num_blocks - used))
        tokens.extend(range(span.token_offset, span.token_offset + span.length))
        rows.extend(range(i * num_queries, i * num_queries + span.length))
    block_tables = torch.tensor(tables, dtype=torch.long)  # [B, num_blocks]
    starts = torch.tensor([span.start for span in spans])  # [B]
    lengths = torch.tensor([span.length for span in spans])  # [B]
    offsets = torch.arange(num_queries)  # [Q]
    # query_pos[b, i]: position of sequence b's i-th query, -1 for padding
    query_pos = torch.where(offsets[None, :] < lengths[:, None], starts[:, None] + offsets[None, :], -1)
    key_pos = torch.arange(num_keys)
    # query at position p sees keys 0..p; a padded query (p = -1) sees key 0 so softmax stays finite.
    mask = key_pos[None, None, :] <= query_pos.clamp(min=0)[:, :, None]  # [B, Q, K]
    sliding = None
    if sliding_window is not None and num_keys > sliding_window:
        sliding = mask & (query_pos.clamp(min=0)[:, :, None] - key_pos[None, None, :] < sliding_window)
        sliding = sliding.unsqueeze(1).to(device)
    in_order = tokens == rows == list(range(len(spans) * num_queries))  # no padding, no reordering
    return AttentionGroup(
        tokens=torch.tensor(tokens, dtype=torch.long, device=device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        num_seqs=len(spans),
        num_queries=num_queries,
        block_tables=block_tables.to(device),
        num_keys=num_keys,
        mask=mask.unsqueeze(1).to(device),
        sliding_mask=sliding,
        in_order=in_order,
    )


def build_attention_batch(
    spans: list[SeqSpan],
    slot_mapping: list[int],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionBatch:
    """Group the step's sequences (decodes apart from prefill chunks) and build their masks once."""
    decodes = [span for span in spans if span.length == 1]
    prefills = [span for span in spans if span.length > 1]
    groups = [_build_group(group, block_size, sliding_window, device) for group in (decodes, prefills) if group]
    return AttentionBatch(torch.tensor(slot_mapping, dtype=torch.long, device=device), groups, block_size)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: AttentionBatch,
    scaling: float,
    sliding: bool,
) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend each query to its sequence's context.

    Args:
        q: [T, H, D] queries (rotary applied).
        k, v: [T, Hkv, D] the step's new keys and values.
        key_cache, value_cache: [slots, Hkv, D] this layer's cache.
        batch: the step's attention metadata.
        scaling: softmax scale.
        sliding: whether this layer uses the sliding-window mask.

    Returns:
        [T, H, D] attention output.
    """
    key_cache.index_copy_(0, batch.slot_mapping, k)
    value_cache.index_copy_(0, batch.slot_mapping, v)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size = batch.block_size
    out = torch.empty_like(q)
    for group in batch.groups:
        b, n_q = group.num_seqs, group.num_queries
        if group.in_order:
            queries = q[: b * n_q]
        else:
            queries = q.new_zeros(b * n_q, num_heads, head_dim)
            queries[group.rows] = q[group.tokens]
        # Whole blocks are gathered (a copy per block, not per position), then cut to the context.
        blocks = group.block_tables.view(-1)
        keys = key_cache.view(-1, block_size, *key_cache.shape[1:]).index_select(0, blocks)  # [B * nb, bs, Hkv, D]
        values = value_cache.view(-1, block_size, *value_cache.shape[1:]).index_select(0, blocks)
        keys = keys.view(b, -1, *key_cache.shape[1:])[:, : group.num_keys]  # [B, K, Hkv, D]
        values = values.view(b, -1, *value_cache.shape[1:])[:, : group.num_keys]
        mask = group.sliding_mask if sliding and group.sliding_mask is not None else group.mask
        attended = F.scaled_dot_product_attention(
            queries.view(b, n_q, num_heads, head_dim).transpose(1, 2),  # [B, H, Q, D]
            keys.transpose(1, 2),  # [B, Hkv, K, D]
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scaling,
            enable_gqa=keys.shape[2] != num_heads,
        )  # [B, H, Q, D]
        attended = attended.transpose(1, 2).reshape(b * n_q, num_heads, head_dim)
        if group.in_order:
            out[: b * n_q] = attended
        else:
            out[group.tokens] = attended[group.rows]
    return out

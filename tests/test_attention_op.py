"""Paged attention (engine/attention.py) against a per-sequence reference written out by hand.

Table-driven over block sizes, GQA ratios, decode/prefill mixes, context lengths and sliding
windows: every query must see exactly positions max(0, p - window + 1) .. p of its own sequence,
read through its block table from a cache whose blocks are scattered and shared with others.
"""

import math

import pytest
import torch

from loraplex.engine.ops.attention import SeqSpan, build_attention_batch, paged_attention


def reference_attention(q, keys, values, positions, window, scaling):
    """q: [n, H, D] at `positions`; keys, values: [L, Hkv, D] of the whole sequence -> [n, H, D]."""
    group = q.shape[1] // keys.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for i, p in enumerate(positions):
        first = 0 if window is None else max(0, p - window + 1)
        k = keys[first : p + 1].double().repeat_interleave(group, dim=1)  # [n_k, H, D]
        v = values[first : p + 1].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[i].double(), k) * scaling
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(dim=-1), v)
    return out


@pytest.mark.parametrize(
    ("block_size", "heads", "kv_heads", "spans", "window"),
    [
        (16, 4, 2, [(40, 1), (3, 1), (0, 7)], None),  # two decodes and a first prefill chunk
        (4, 4, 4, [(0, 13), (13, 1), (5, 6)], None),  # a later prefill chunk after cached context
        (8, 8, 2, [(29, 1)] * 5, None),  # decodes only, GQA 4:1
        (16, 2, 1, [(0, 33), (2, 1)], None),  # prefill only spans blocks; MQA
        (4, 4, 2, [(20, 1), (0, 18), (9, 4)], 6),  # sliding window shorter than the contexts
        (1, 2, 2, [(6, 1), (0, 3)], 4),  # block size 1
    ],
)
def test_paged_attention_equals_per_sequence_reference(block_size, heads, kv_heads, spans, window):
    torch.manual_seed(block_size * 100 + heads * 10 + len(spans))
    head_dim = 16
    lengths = [start + length for start, length in spans]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    order = torch.randperm(num_blocks - 1) + 1  # blocks scattered over the cache; block 0 unused
    key_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
    value_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
    seq_spans, slot_mapping, histories, taken, offset = [], [], [], 0, 0
    q_all, k_all, v_all = [], [], []
    for start, length in spans:
        used = -(-(start + length) // block_size)
        table = order[taken : taken + used].tolist()
        taken += used
        seq_spans.append(SeqSpan(offset, start, length, table))
        offset += length
        slots = [table[p // block_size] * block_size + p % block_size for p in range(start + length)]
        slot_mapping += slots[start:]
        q_all.append(torch.randn(length, heads, head_dim))
        k_all.append(torch.randn(length, kv_heads, head_dim))
        v_all.append(torch.randn(length, kv_heads, head_dim))
        histories.append(slots)
    q, k, v = torch.cat(q_all), torch.cat(k_all), torch.cat(v_all)
    batch = build_attention_batch(seq_spans, slot_mapping, block_size, window, torch.device("cpu"))
    scaling = 1 / math.sqrt(head_dim)
    out = paged_attention(q, k, v, key_cache, value_cache, batch, scaling, sliding=window is not None)
    for span, slots, queries in zip(seq_spans, histories, q_all):
        keys, values = key_cache[slots], value_cache[slots]  # the cache now holds the step's K/V too
        positions = range(span.start, span.start + span.length)
        expected = reference_attention(queries, keys, values, positions, window, scaling)
        got = out[span.token_offset : span.token_offset + span.length]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

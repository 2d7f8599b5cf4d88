"""Paged attention as one Triton kernel: a step's decodes and prefill chunks, K/V read in place.

Owns: the kernel and its launcher, `paged_attention_triton`. Semantics are those of `paged_attention`
in attention.py (the oracle): query i of sequence b, at position p = seq_lens[b] - q_len_b + i,
attends the keys of its own sequence at positions max(0, p - window + 1) .. p, read from cache slot
`block_tables[b, pos // block_size] * block_size + pos % block_size`, with kv head h // (H // Hkv):

    out[t, h] = softmax(q[t, h] . K[b, :, h // group]^T * scale) @ V[b, :, h // group]

Must not: write the step's K/V (the caller has done so before the launch), build metadata, or import
the rest of loraplex; it takes plain tensors. Flat varlen: decodes (q_len 1) and prefill chunks
(q_len > 1, starting anywhere in a sequence) share one launch and nothing is padded.
"""

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, H, D]
    key_cache_ptr,  # [slots, Hkv, D]
    value_cache_ptr,  # [slots, Hkv, D]
    out_ptr,  # [T, H, D]
    query_starts_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    stride_q_token,
    stride_q_head,
    stride_cache_slot,
    stride_cache_head,
    stride_out_token,
    stride_out_head,
    stride_table,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    window,  # sliding window, read only when SLIDING
    block_size,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two of HEAD_DIM, >= 16
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_Q: tl.constexpr,  # queries per tile: BLOCK_Q * GROUP <= BLOCK_M
    BLOCK_M: tl.constexpr,  # tile rows: (query, head in group) pairs
    BLOCK_N: tl.constexpr,  # keys per tile, independent of block_size
    SLIDING: tl.constexpr,
):
    seq = tl.program_id(0)
    query_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    query_start = tl.load(query_starts_ptr + seq)
    query_len = tl.load(query_starts_ptr + seq + 1) - query_start
    if query_tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # positions cached before this step's tokens

    # Row m of the tile is query (query_tile * BLOCK_Q + m // GROUP), head kv_head * GROUP + m % GROUP.
    rows = tl.arange(0, BLOCK_M)  # [M]
    query_index = query_tile * BLOCK_Q + rows // GROUP  # [M] within the sequence's queries
    head = kv_head * GROUP + rows % GROUP  # [M]
    row_valid = (rows < BLOCK_Q * GROUP) & (query_index < query_len)  # [M]
    query_pos = context_len + query_index  # [M]
    dims = tl.arange(0, HEAD_DIM_PAD)  # [Dp]
    dim_valid = dims < HEAD_DIM

    token = (query_start + query_index).to(tl.int64)  # [M]
    q_offsets = token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]  # [M, Dp]
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)  # [M, Dp]

    # Keys this tile can see: from the first query's window start to the last query's own position.
    first_pos = context_len + query_tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    key_start = 0
    if SLIDING:
        key_start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    key_end = last_pos + 1

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [M] running max, base 2
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # [M] running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)  # [M, Dp] running numerator @ V
    cache_head = kv_head.to(tl.int64) * stride_cache_head
    for tile_start in range(key_start, key_end, BLOCK_N):
        key_pos = tile_start + tl.arange(0, BLOCK_N)  # [N]
        key_valid = key_pos < seq_len  # [N] never read past the context (stale or foreign slots)
        block = tl.load(block_tables_ptr + seq * stride_table + key_pos // block_size, mask=key_valid, other=0)  # [N]
        slot = block.to(tl.int64) * block_size + key_pos % block_size  # [N]
        cache_offsets = slot * stride_cache_slot + cache_head  # [N]
        k_mask = dim_valid[:, None] & key_valid[None, :]  # [Dp, N]
        v_mask = key_valid[:, None] & dim_valid[None, :]  # [N, Dp]
        k = tl.load(key_cache_ptr + cache_offsets[None, :] + dims[:, None], mask=k_mask, other=0.0)  # [Dp, N] K^T
        v = tl.load(value_cache_ptr + cache_offsets[:, None] + dims[None, :], mask=v_mask, other=0.0)  # [N, Dp]

        scores = tl.dot(q, k, input_precision="ieee") * qk_scale  # [M, N] fp32
        visible = key_pos[None, :] <= query_pos[:, None]  # [M, N] causal (so within seq_len)
        if SLIDING:
            visible = visible & (query_pos[:, None] - key_pos[None, :] < window)
        scores = tl.where(visible, scores, float("-inf"))

        # Online softmax; a row that sees no key yet keeps max -inf, so shift by 0 to stay finite.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))  # [M]
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)  # [M]
        probs = tl.exp2(scores - shift[:, None])  # [M, N]
        rescale = tl.exp2(row_max - shift)  # [M]
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    out = acc / row_sum[:, None]  # [M, Dp]; every valid row saw at least its own position
    out_offsets = token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def _launch_config(num_heads: int, num_kv_heads: int, head_dim: int, max_query_len: int) -> dict[str, int]:
    """The tile sizes for a step's shapes.

    Args:
        num_heads, num_kv_heads: query and kv heads (num_heads a multiple of num_kv_heads).
        head_dim: the head size D.
        max_query_len: the longest sequence's query count this step.

    Returns:
        BLOCK_M (tile rows, >= 16 for tl.dot), BLOCK_Q (queries per tile), BLOCK_N (keys per tile)
        and HEAD_DIM_PAD.
    """
    group = num_heads // num_kv_heads
    rows = 64 if max_query_len * group >= 64 else 16  # decode-only steps keep the small tile
    block_m = max(rows, triton.next_power_of_2(group))
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    return {
        "BLOCK_M": block_m,
        "BLOCK_Q": block_m // group,
        "BLOCK_N": 64 if head_dim_pad <= 128 else 32,
        "HEAD_DIM_PAD": head_dim_pad,
    }


def paged_attention_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    out: torch.Tensor,
) -> None:
    """Attend every query of a step to its sequence's cached context, writing `out` in one launch.

    Grid `(B, cdiv(max_query_len, BLOCK_Q), Hkv)`: one program per (sequence, tile of its queries,
    kv head); programs past a sequence's queries return at once. A tile's BLOCK_M rows are BLOCK_Q
    queries x the GROUP = H // Hkv query heads sharing the kv head, so a decode fills the tl.dot M
    dimension with its group (padded to 16) and each K/V tile is loaded once per group. Keys go in
    tiles of BLOCK_N positions independent of block_size: each key's slot comes from its own block
    table entry, so any block_size >= 1 works and K/V are read in place, never gathered. Online
    softmax across key tiles, fp32 accumulation; keys before the tile's sliding window are skipped.

    Args:
        q: [T, H, D] the step's queries, rotary applied; last dim contiguous.
        key_cache, value_cache: [num_blocks * block_size, Hkv, D], the step's K/V already written.
        query_starts: [B + 1] int32, sequence b's queries are rows query_starts[b] .. query_starts[b + 1] - 1.
        seq_lens: [B] int32, each sequence's context length including this step's tokens.
        block_tables: [B, max_blocks] int32, cache block of each block of context; entries past a
            sequence's last block are never read (padding may be anything, e.g. 0).
        block_size: cache slots per block.
        scale: softmax scale.
        sliding_window: keys with p - key_pos >= sliding_window are hidden; None for full attention.
        max_query_len: the largest query_starts[b + 1] - query_starts[b] (sizes the grid).
        out: [T, H, D] written with the attention output, in its own dtype.
    """
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[1]
    for name, tensor in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must share strides")
    config = _launch_config(num_heads, num_kv_heads, head_dim, max_query_len)
    grid = (num_seqs, triton.cdiv(max_query_len, config["BLOCK_Q"]), num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        key_cache,
        value_cache,
        out,
        query_starts,
        seq_lens,
        block_tables,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        scale * _LOG2E,
        sliding_window or 0,
        block_size,
        HEAD_DIM=head_dim,
        GROUP=num_heads // num_kv_heads,
        SLIDING=sliding_window is not None,
        **config,
    )

"""Which implementation of the step's attention and LoRA ops runs: one interface each, a backend per device.

Owns: `StepOps` (the attention op and the LoRA op the runner and every LoRA wrapper call), its two
backends, and `resolve_kernel_backend`, which picks one from `EngineConfig.kernel_backend`:
  * reference: the pure-PyTorch ops of attention.py and lora.py, the oracle every kernel is tested
    against, and the fastest on CPU (oneDNN GEMMs, SDPA);
  * triton: the Triton kernels of attention_triton.py and lora_triton.py (paged attention reading
    the block table in place; fused SGMV/BGMV LoRA shrink and expand), the default on CUDA. On a
    CPU they run only under Triton's interpreter (`TRITON_INTERPRET=1`), which is how tests check
    them here.
Each op has two calls: `prepare` builds the step's metadata once, on the host, from plain lists;
the op itself runs per layer and must not touch the host. Triton is imported only when its backend
is chosen. Nothing here decides what the step computes: both backends give the same values.
"""

import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.engine.ops.attention import AttentionBatch, SeqSpan, build_attention_batch, paged_attention
from loraplex.engine.ops.lora import STRATEGIES, LoraBatch, add_lora_delta, build_lora_batch
from loraplex.engine.step_inputs import to_device
from loraplex.errors import ModelLoadError


class ReferenceAttention:
    """Paged attention in PyTorch: gathers each group's blocks, then SDPA (attention.py)."""

    name = "reference"

    def prepare(
        self, spans: list[SeqSpan], slot_mapping: list[int], block_size: int, sliding_window: int | None, device: torch.device
    ) -> AttentionBatch:
        return build_attention_batch(spans, slot_mapping, block_size, sliding_window, device)

    def attend(self, q, k, v, key_cache, value_cache, batch: AttentionBatch, scaling: float, sliding: bool) -> torch.Tensor:
        """q: [T, H, D], k and v: [T, Hkv, D], caches [slots, Hkv, D] -> [T, H, D]."""
        return paged_attention(q, k, v, key_cache, value_cache, batch, scaling, sliding)


class ReferenceLora:
    """The batched LoRA delta in PyTorch, one member at a time (lora.py's strategies)."""

    name = "reference"
    variants = STRATEGIES  # what the start-up check runs once each

    def prepare(
        self, token_slots: list[int], slot_ranks: dict[int, int], max_rank: int, num_slots: int, device: torch.device, variant: str
    ) -> LoraBatch | None:
        return build_lora_batch(token_slots, slot_ranks, max_rank, device, variant)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], batch) -> None:
        """y: [T, sum(out_m)], member m owning the next out_m columns; x: [T, in]; stacks as lora.py."""
        start = 0
        for member_a, member_b in zip(lora_a, lora_b, strict=True):
            end = start + member_b.shape[2]
            add_lora_delta(y[:, start:end], x, member_a, member_b, batch)
            start = end


@dataclass
class TritonAttentionBatch:
    """The step's attention metadata in the flat varlen form the Triton kernel reads."""

    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token's K and V
    query_starts: torch.Tensor  # [B + 1] int32: sequence b's queries are rows query_starts[b] .. [b + 1] - 1
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence, this step's tokens included
    block_tables: torch.Tensor  # [B, max_blocks] int32 (padding: block 0)
    max_query_len: int
    block_size: int
    sliding_window: int | None


class TritonAttention:
    """Paged attention by a Triton kernel over the block table, decodes and prefill chunks in one launch."""

    name = "triton"

    def __init__(self):
        from loraplex.engine.ops import attention_triton

        self._kernel = attention_triton.paged_attention_triton

    def prepare(
        self, spans: list[SeqSpan], slot_mapping: list[int], block_size: int, sliding_window: int | None, device: torch.device
    ) -> TritonAttentionBatch:
        starts = [0]
        for span in spans:
            starts.append(starts[-1] + span.length)
        seq_lens = [span.start + span.length for span in spans]
        num_blocks = max(-(-length // block_size) for length in seq_lens)
        flat_tables = []  # [B * num_blocks]; entries past a sequence's last block are never read
        for span in spans:
            used = span.block_table[:num_blocks]
            flat_tables += used + [0] * (num_blocks - len(used))
        slots, query_starts, lengths, block_tables = to_device((slot_mapping, starts, seq_lens, flat_tables), torch.int32, device)
        return TritonAttentionBatch(
            slot_mapping=slots.long(),  # index_copy_ takes int64 indices
            query_starts=query_starts,
            seq_lens=lengths,
            block_tables=block_tables.view(len(spans), num_blocks),
            max_query_len=max(span.length for span in spans),
            block_size=block_size,
            sliding_window=sliding_window,
        )

    def attend(self, q, k, v, key_cache, value_cache, batch: TritonAttentionBatch, scaling: float, sliding: bool) -> torch.Tensor:
        """q: [T, H, D], k and v: [T, Hkv, D], caches [slots, Hkv, D] -> [T, H, D]."""
        key_cache.index_copy_(0, batch.slot_mapping, k)
        value_cache.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)
        window = batch.sliding_window if sliding else None
        self._kernel(
            q, key_cache, value_cache, batch.query_starts, batch.seq_lens, batch.block_tables,
            batch.block_size, scaling, window, batch.max_query_len, out,
        )  # fmt: skip
        return out


class TritonLora:
    """The batched LoRA delta by Triton SGMV/BGMV kernels, every member of a fused group in one launch each."""

    name = "triton"
    variants = ("auto", "sgmv", "bgmv")  # what the start-up check runs once each

    def __init__(self):
        from loraplex.engine.ops import lora_triton

        self._kernels = lora_triton

    def prepare(self, token_slots, slot_ranks, max_rank, num_slots, device, variant):
        """`variant`: a kernel variant, or a reference strategy (`--lora-strategy`), which leaves the choice to the kernels."""
        if not slot_ranks:
            return None
        variant = variant if variant in self.variants else "auto"
        upload = functools.partial(to_device, dtype=torch.int32, device=device)
        return self._kernels.build_kernel_batch(token_slots, slot_ranks, num_slots, device, variant, upload)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], batch) -> None:
        """y: [T, sum(out_m)], member m owning the next out_m columns; x: [T, in]; stacks as lora.py."""
        dtype = lora_a[0].dtype
        if x.dtype != dtype or y.dtype != dtype:  # a quantized base computing in another dtype
            delta = torch.zeros(y.shape, dtype=dtype, device=y.device)
            self._kernels.add_lora_delta_triton(delta, x.to(dtype).contiguous(), lora_a, lora_b, batch)
            y += delta.to(y.dtype)
            return
        self._kernels.add_lora_delta_triton(y, x.contiguous(), lora_a, lora_b, batch)


@dataclass
class StepOps:
    """The ops one engine's steps run; `name` is the backend's."""

    name: str
    attention: ReferenceAttention | TritonAttention
    lora: ReferenceLora | TritonLora


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_kernel_backend(setting: str, device: torch.device) -> str:
    """`reference` or `triton` for `EngineConfig.kernel_backend` on `device`.

    Raises:
        ModelLoadError: triton was asked for where it cannot run.
    """
    if setting == "reference":
        return "reference"
    if setting == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "reference"
    if not triton_installed():
        raise ModelLoadError("--kernel-backend triton needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ModelLoadError(
            f"--kernel-backend triton runs on CUDA; on {device.type} only under Triton's interpreter (TRITON_INTERPRET=1, for tests)"
        )
    return "triton"


def make_step_ops(setting: str, device: torch.device) -> StepOps:
    """The ops for `EngineConfig.kernel_backend` = `setting` on `device`."""
    if resolve_kernel_backend(setting, device) == "triton":
        return StepOps("triton", TritonAttention(), TritonLora())
    return StepOps("reference", ReferenceAttention(), ReferenceLora())

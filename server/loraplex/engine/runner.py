"""One forward pass over a scheduled step: flat tokens, paged KV, unmerged LoRA.

Owns: turning a step's scheduled sequences into flat input tensors (ordered by LoRA slot so each
adapter's tokens are contiguous), building the step's attention and LoRA metadata once, and
driving the Hugging Face decoder layers of the base (embedding, norms, rotary, MLP, lm_head are
the model's own modules, q/k/v and gate/up as one GEMM each where they were fused at start-up;
attention is ours, over the paged cache). It returns logits; sampling is
not its business.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.engine.kv_cache import KVCache
from loraplex.engine.lora_layer import LoraContext
from loraplex.engine.ops.attention import SeqSpan
from loraplex.engine.ops.backend import StepOps
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.engine.step_inputs import to_device


@dataclass
class LogitRows:
    """Which rows of the step's logits belong to which scheduled sequence."""

    sample_rows: dict[int, int]  # index in the batch -> row whose logits pick its next token
    prompt_rows: dict[int, tuple[int, int]]  # index in the batch -> (first row, count) of prompt logits

    def rows_of(self, index: int) -> list[int]:
        """Every row of logits that belongs to the batch's sequence `index`."""
        first, count = self.prompt_rows.get(index, (0, 0))
        rows = list(range(first, first + count))
        return rows + [self.sample_rows[index]] if index in self.sample_rows else rows


@dataclass
class StepLists:
    """A step flattened on the host, sequences ordered by LoRA slot."""

    token_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    slot_mapping: list[int] = field(default_factory=list)  # [T] cache slot of each token's K and V
    token_slots: list[int] = field(default_factory=list)  # [T] LoRA slot of each token (null slot: none)
    slot_ranks: dict[int, int] = field(default_factory=dict)  # rank of each adapter slot in the step
    spans: list[SeqSpan] = field(default_factory=list)  # one per sequence, in token order
    logit_tokens: list[int] = field(default_factory=list)  # [R] tokens whose logits are wanted
    rows: LogitRows | None = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding as the Hugging Face Llama family applies it.

    Args:
        q: [T, H, D], k: [T, Hkv, D], cos and sin: [T, D].
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _sliding_layers(hf_config) -> tuple[int | None, list[bool]]:
    """The sliding window, if any, and which layers use it (Mistral: all; Qwen: per `layer_types`)."""
    window = getattr(hf_config, "sliding_window", None)
    num_layers = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if not window:
        return None, [False] * num_layers
    if layer_types is not None:
        return window, [kind == "sliding_attention" for kind in layer_types]
    return window, [True] * num_layers


class ModelRunner:
    """Runs the base decoder over a step's tokens.

    Args:
        model: the Hugging Face causal LM, its projections already wrapped for LoRA.
        kv_cache: the paged cache sized for this model.
        lora_context: shared with every wrapper; set here around each forward.
        device: where the model lives.
        max_lora_rank: the slot stacks' rank.
        lora_strategy: how the reference LoRA op computes the deltas (`EngineConfig.lora_strategy`).
        ops: the attention and LoRA backends (`EngineConfig.kernel_backend`); the LoRA one is also
            the context's, which every wrapper calls.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        lora_context: LoraContext,
        device: torch.device,
        max_lora_rank: int,
        lora_strategy: str,
        ops: StepOps,
    ):
        self.model = model
        self.ops = ops
        lora_context.op = ops.lora
        self.max_lora_rank = max_lora_rank
        self.lora_strategy = lora_strategy
        self.decoder = model.model
        self.kv_cache = kv_cache
        self.lora_context = lora_context
        self.device = device
        self.sliding_window, self.sliding = _sliding_layers(model.config)
        self.graphs = None  # decode_graphs.DecodeGraphs, set by the engine with --cuda-graphs

    def step_lists(self, batch: list[ScheduledSeq], null_slot: int) -> StepLists:
        """Flatten a step into host lists, ordering sequences by LoRA slot (each adapter's tokens contiguous)."""
        order = sorted(range(len(batch)), key=lambda i: null_slot if batch[i].request.slot is None else batch[i].request.slot)
        lists = StepLists()
        sample_rows: dict[int, int] = {}
        prompt_rows: dict[int, tuple[int, int]] = {}
        for i in order:
            seq = batch[i]
            request = seq.request
            offset = len(lists.token_ids)
            end = seq.start + seq.length
            lists.token_ids.extend(request.all_ids[seq.start : end])
            lists.positions.extend(range(seq.start, end))
            lists.slot_mapping.extend(self.kv_cache.slot(request.block_table, p) for p in range(seq.start, end))
            slot = null_slot if request.slot is None else request.slot
            lists.token_slots.extend([slot] * seq.length)
            if request.slot is not None:
                lists.slot_ranks[slot] = request.adapter.rank
            lists.spans.append(SeqSpan(offset, seq.start, seq.length, request.block_table))
            if request.prompt_logprobs is not None:
                # logits at position p score prompt token p + 1; skip those already scored
                first = max(seq.start, len(request.prompt_logprobs))
                prompt_end = min(end, len(request.prompt_ids) - 1)
                if prompt_end > first:
                    prompt_rows[i] = (len(lists.logit_tokens), prompt_end - first)
                    lists.logit_tokens.extend(range(offset + first - seq.start, offset + prompt_end - seq.start))
            if seq.samples:
                sample_rows[i] = len(lists.logit_tokens)
                lists.logit_tokens.append(offset + seq.length - 1)
        lists.rows = LogitRows(sample_rows, prompt_rows)
        return lists

    def build_inputs(self, lists: StepLists, null_slot: int, lora_strategy: str | None = None):
        """The step's input tensors, attention and LoRA metadata (each built once, sent in one copy each)."""
        attention = self.ops.attention.prepare(lists.spans, lists.slot_mapping, self.kv_cache.block_size, self.sliding_window, self.device)
        strategy = lora_strategy or self.lora_strategy
        lora = self.ops.lora.prepare(lists.token_slots, lists.slot_ranks, self.max_lora_rank, null_slot + 1, self.device, strategy)
        tensors = to_device((lists.token_ids, lists.positions, lists.logit_tokens), torch.long, self.device)
        return tensors, attention, lora

    @torch.inference_mode()
    def run(
        self, batch: list[ScheduledSeq], null_slot: int, lora_strategy: str | None = None
    ) -> tuple[torch.Tensor, LogitRows]:
        """Forward one step (`lora_strategy`, one of the LoRA op's `variants`, overrides the runner's).

        A decode step that a captured graph covers is replayed from it (decode_graphs.py).

        Returns:
            [R, V] float32 logits for the rows named by the returned `LogitRows`.
        """
        lists = self.step_lists(batch, null_slot)
        if self.graphs is not None and lora_strategy is None and self.graphs.covers(lists):
            return self.graphs.replay(lists), lists.rows
        (token_ids, positions, logit_tokens), attention, lora = self.build_inputs(lists, null_slot, lora_strategy)
        return self.logits(token_ids, positions, logit_tokens, attention, lora), lists.rows

    def logits(self, token_ids, positions, logit_tokens, attention, lora) -> torch.Tensor:
        """[R, V] float32 logits at `logit_tokens` of the step's [T] tokens (what a graph captures)."""
        self.lora_context.batch = lora
        try:
            hidden = self._forward(token_ids, positions, attention)  # [T, hidden]
        finally:
            self.lora_context.batch = None
        hidden = self.decoder.norm(hidden.index_select(0, logit_tokens))  # [R, hidden]
        return self.model.lm_head(hidden).float()  # [R, V]

    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(token_ids)  # [T, hidden]
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])  # [1, T, D] each
        cos, sin = cos[0], sin[0]
        for index, layer in enumerate(self.decoder.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = residual + self._attention(index, layer.self_attn, hidden, cos, sin, attention)
            residual = hidden
            hidden = residual + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        return hidden

    @staticmethod
    def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(mlp, "fused_gate_up", None)
        if fused is None:
            return mlp(x)
        gate, up = fused(x)  # [T, intermediate] each
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _attention(self, index, attn: nn.Module, x, cos, sin, attention) -> torch.Tensor:
        num_tokens = x.shape[0]
        head_dim = attn.head_dim
        fused = getattr(attn, "fused_qkv", None)
        q, k, v = fused(x) if fused is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = q.view(num_tokens, -1, head_dim)  # [T, H, D]
        k = k.view(num_tokens, -1, head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, k, cos, sin)
        out = self.ops.attention.attend(
            q,
            k,
            v,
            self.kv_cache.keys[index],
            self.kv_cache.values[index],
            attention,
            attn.scaling,
            self.sliding[index],
        )
        return attn.o_proj(out.reshape(num_tokens, -1))

"""The memory planner: what serving (and training) a base model will cost, from its config.json alone.

Owns: counting a supported checkpoint's parameters from its config, the bytes of its base weights
(plain or bitsandbytes-quantized), of the engine's KV cache and LoRA slot stacks, of one adapter in
host memory, and the full-finetune versus LoRA training comparison; and the rows of a report.
It must not read weights, allocate tensors or print: the figures mirror what `Engine` allocates,
and the CLI renders the rows.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from loraplex.config import EngineConfig
from loraplex.engine.base_model import SUPPORTED_MODEL_TYPES, resolve_dtype

GIB = 1 << 30
NF4_BLOCKSIZE = 64  # bitsandbytes' default: one float32 absmax per 64 weights (loraplex sets no double quant)
NF4_CODE_BYTES = 16 * 4  # each Linear4bit keeps its own 16-entry float32 NF4 code table
INT8_SCALE_BYTES = 4  # Int8Params.SCB: one float32 scale per output row
# Mixed-precision Adam: bf16 weights 2 + bf16 grads 2 + fp32 master 4 + fp32 m 4 + fp32 v 4.
# (In float32 it is weights 4 + grads 4 + m 4 + v 4: the same 16.)
FULL_FINETUNE_BYTES_PER_PARAM = 16
# PEFT upcasts LoRA weights to float32 (autocast_adapter_dtype): weights 4 + grads 4 + m 4 + v 4.
LORA_TRAINABLE_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class ModelShape:
    """The widths of a llama-family decoder that decide its memory, as its config states them."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    biased: frozenset[str]  # projections that carry a bias
    qk_norm: bool  # qwen3's per-head RMSNorm on queries and keys

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each targetable linear of one decoder layer, as (in_features, out_features)."""
        hidden, inter = self.hidden_size, self.intermediate_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (hidden, q_width),
            "k_proj": (hidden, kv_width),
            "v_proj": (hidden, kv_width),
            "o_proj": (q_width, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }


def _biased_projections(config: PretrainedConfig) -> frozenset[str]:
    if config.model_type == "qwen2":
        return frozenset({"q_proj", "k_proj", "v_proj"})
    if config.model_type == "mistral":
        return frozenset()
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"} if getattr(config, "attention_bias", False) else set()
    mlp = {"gate_proj", "up_proj", "down_proj"} if getattr(config, "mlp_bias", False) else set()
    return frozenset(attention | mlp)


def model_shape(config: PretrainedConfig) -> ModelShape:
    """Read the widths of a llama, mistral, qwen2 or qwen3 config (head_dim as the engine reads it)."""
    return ModelShape(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        biased=_biased_projections(config),
        qk_norm=config.model_type == "qwen3",
    )


def load_model_config(model: str | Path) -> PretrainedConfig:
    """Read a checkpoint's config.json (never its weights).

    Args:
        model: a checkpoint directory holding config.json, or the path of a config.json file.

    Raises:
        ValueError: naming the problem (missing path or file, unreadable config, unsupported model type).
    """
    path = Path(model)
    if not path.exists():
        raise ValueError(f"{path} does not exist: pass a model directory or its config.json")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ValueError(f"{path} is not a model directory: config.json is missing")
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; loraplex serves {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        config = AutoConfig.from_pretrained(str(config_file))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{config_file} is not a readable {model_type} config: {exc}") from None
    return config


def linear_weight_bytes(in_features: int, out_features: int, quantize: str, dtype_bytes: int) -> int:
    """Bytes one linear's weight (not its bias) takes as loraplex loads it.

    Args:
        in_features / out_features: the linear's widths.
        quantize: `none`, `nf4` (bitsandbytes Params4bit: two weights per byte, a float32 absmax per
            64-weight block, a float32 code table) or `int8` (Int8Params: a byte per weight and a
            float32 scale per output row).
        dtype_bytes: bytes per element of the unquantized dtype.
    """
    numel = in_features * out_features
    if quantize == "nf4":
        return (numel + 1) // 2 + 4 * -(-numel // NF4_BLOCKSIZE) + NF4_CODE_BYTES
    if quantize == "int8":
        return numel + INT8_SCALE_BYTES * out_features
    return numel * dtype_bytes


def layer_other_params(shape: ModelShape) -> int:
    """Parameters of one decoder layer outside the projection weights: biases and RMSNorms."""
    projections = shape.projections()
    biases = sum(projections[name][1] for name in shape.biased)
    norms = 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0)
    return biases + norms


def outer_params(shape: ModelShape) -> int:
    """Parameters outside the decoder layers: embeddings, the final norm and an untied lm_head."""
    embeddings = shape.vocab_size * shape.hidden_size
    return embeddings * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


def lora_params_per_layer(shape: ModelShape, rank: int) -> int:
    """LoRA parameters of one layer with every projection targeted: A [r, in] plus B [out, r] each."""
    return sum(rank * (in_features + out_features) for in_features, out_features in shape.projections().values())


@dataclass(frozen=True)
class MemoryPlan:
    """Byte figures for one base model under one engine configuration (sizes in bytes)."""

    shape: ModelShape
    dtype: str
    quantize: str
    num_parameters: int  # every parameter of the model, a tied lm_head counted once
    base_linear_bytes: int  # the seven projections of every layer, quantized when asked
    base_other_bytes: int  # embeddings, lm_head, norms and biases, in dtype
    max_model_len: int
    max_num_seqs: int
    block_size: int
    num_kv_blocks: int
    kv_bytes_per_token: int  # K and V of every layer
    max_loras: int
    max_lora_rank: int
    slot_bytes: int  # lora_a [max_loras + 1, max_lora_rank, in] + lora_b [.., out] of every wrapper
    adapter_rank: int
    adapter_host_bytes: int  # one adapter of adapter_rank on all seven projections, in dtype
    lora_parameters: int  # the same adapter's parameter count

    @property
    def base_weight_bytes(self) -> int:
        return self.base_linear_bytes + self.base_other_bytes

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        """The blocks, plus the one scratch block the engine keeps for padding rows of captured steps."""
        return (self.num_kv_blocks + 1) * self.block_size * self.kv_bytes_per_token

    @property
    def device_bytes(self) -> int:
        """What the engine allocates up front: base weights, KV cache and slot stacks."""
        return self.base_weight_bytes + self.kv_cache_bytes + self.slot_bytes

    @property
    def adapters_per_gib(self) -> int:
        return GIB // self.adapter_host_bytes

    @property
    def full_finetune_bytes(self) -> int:
        return FULL_FINETUNE_BYTES_PER_PARAM * self.num_parameters

    @property
    def lora_finetune_bytes(self) -> int:
        """The frozen base as served (quantized for QLoRA) plus the trainable LoRA parameters."""
        return self.base_weight_bytes + LORA_TRAINABLE_BYTES_PER_PARAM * self.lora_parameters

    def to_table(self) -> list[tuple[str, str]]:
        """The report as (figure, value) rows, ready for a two-column table."""
        shape = self.shape
        linears = self.dtype if self.quantize == "none" else self.quantize
        training_base = "QLoRA" if self.quantize == "nf4" else "LoRA"
        return [
            (
                "model",
                f"{shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
                f"{shape.num_heads} heads ({shape.num_kv_heads} KV) of {shape.head_dim}, vocab {shape.vocab_size}",
            ),
            ("parameters", format_count(self.num_parameters)),
            (
                "base weights",
                f"{format_bytes(self.base_weight_bytes)} (projections in {linears} {format_bytes(self.base_linear_bytes)}, "
                f"embeddings/norms/lm_head in {self.dtype} {format_bytes(self.base_other_bytes)})",
            ),
            (
                "KV cache",
                f"{format_bytes(self.kv_cache_bytes)} ({format_bytes(self.kv_bytes_per_token)}/token x "
                f"{self.kv_cache_tokens:,} tokens in {self.num_kv_blocks:,} blocks of {self.block_size}; "
                f"{self.max_num_seqs} seqs x max_model_len {self.max_model_len}; on CUDA, without --num-kv-blocks, the engine "
                "takes what --gpu-memory-utilization leaves)",
            ),
            (
                "adapter slots",
                f"{format_bytes(self.slot_bytes)} ({self.max_loras} slots + 1 null slot, rank {self.max_lora_rank}, {self.dtype})",
            ),
            ("device total", f"{format_bytes(self.device_bytes)} (weights + KV cache + slots; activations and CUDA context extra)"),
            (
                "host memory per adapter",
                f"{format_bytes(self.adapter_host_bytes)} (rank {self.adapter_rank} on all 7 projections, {self.dtype}): "
                f"{self.adapters_per_gib:,} per GiB",
            ),
            (
                "full finetune (Adam)",
                f"{format_bytes(self.full_finetune_bytes)} ({format_count(self.num_parameters)} params x "
                f"{FULL_FINETUNE_BYTES_PER_PARAM} B: weights, grads, fp32 master, m, v)",
            ),
            (
                f"{training_base} finetune (Adam)",
                f"{format_bytes(self.lora_finetune_bytes)} (frozen {linears} base {format_bytes(self.base_weight_bytes)} + "
                f"{format_count(self.lora_parameters)} rank-{self.adapter_rank} params x {LORA_TRAINABLE_BYTES_PER_PARAM} B)",
            ),
            ("training note", "activations excluded: they grow with batch size and sequence length"),
        ]

    def render(self) -> str:
        """The report as aligned plain text, one figure per line."""
        rows = self.to_table()
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def format_bytes(size: int) -> str:
    """Binary units: `512 B`, `1.5 KiB`, `12.3 MiB`, `14.96 GiB`."""
    for unit, scale, digits in (("GiB", GIB, 2), ("MiB", 1 << 20, 1), ("KiB", 1 << 10, 1)):
        if size >= scale:
            return f"{size / scale:.{digits}f} {unit}"
    return f"{size} B"


def format_count(count: int) -> str:
    """Parameter counts: `8.03 B`, `41.9 M`, `123.5 K`, `64`."""
    for unit, scale, digits in (("B", 10**9, 2), ("M", 10**6, 1), ("K", 10**3, 1)):
        if count >= scale:
            return f"{count / scale:.{digits}f} {unit}"
    return str(count)


def plan_memory(
    model: str | Path,
    quantize: str = "none",
    dtype: str = "bfloat16",
    max_loras: int = 8,
    max_lora_rank: int = 64,
    max_model_len: int | None = None,
    max_num_seqs: int = 32,
    adapter_rank: int = 16,
    block_size: int = 16,
    num_kv_blocks: int | None = None,
) -> MemoryPlan:
    """Plan the memory of serving `model` with loraplex, from its config.json alone.

    Args:
        model: a checkpoint directory or the path of its config.json.
        quantize: `none`, `nf4` or `int8`, as `EngineConfig.quantize`.
        dtype: `float32`, `bfloat16`, `float16`, or `auto` (bfloat16: the plan is for a CUDA device).
        max_loras / max_lora_rank: the engine's device slots and their rank.
        max_model_len: tokens per sequence; by default min(max_position_embeddings, 4096), as the engine.
        max_num_seqs / block_size / num_kv_blocks: the KV cache's sizing, as `EngineConfig`.
        adapter_rank: the rank of the adapters to size in host memory and to compare training with.

    Raises:
        ValueError: for a missing or unsupported model, or settings the engine would refuse.
    """
    engine = EngineConfig(
        model=str(model),
        dtype=dtype,
        quantize=quantize,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
    )
    if not 1 <= adapter_rank <= engine.max_lora_rank:
        raise ValueError(f"adapter_rank {adapter_rank} must be in [1, max_lora_rank={engine.max_lora_rank}]")
    config = load_model_config(model)
    shape = model_shape(config)
    torch_dtype = resolve_dtype(engine.dtype, torch.device("cuda"), engine.quantize)
    dtype_bytes = torch_dtype.itemsize
    projections = shape.projections().values()
    linear_params = shape.num_layers * sum(i * o for i, o in projections)
    other_params = shape.num_layers * layer_other_params(shape) + outer_params(shape)
    model_len = engine.model_len(getattr(config, "max_position_embeddings", None))
    kv_bytes_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes
    return MemoryPlan(
        shape=shape,
        dtype=str(torch_dtype).removeprefix("torch."),
        quantize=engine.quantize,
        num_parameters=linear_params + other_params,
        base_linear_bytes=shape.num_layers * sum(linear_weight_bytes(i, o, engine.quantize, dtype_bytes) for i, o in projections),
        base_other_bytes=other_params * dtype_bytes,
        max_model_len=model_len,
        max_num_seqs=engine.max_num_seqs,
        block_size=engine.block_size,
        num_kv_blocks=engine.kv_blocks(model_len, kv_bytes_per_token * engine.block_size),
        kv_bytes_per_token=kv_bytes_per_token,
        max_loras=engine.max_loras,
        max_lora_rank=engine.max_lora_rank,
        slot_bytes=shape.num_layers * (engine.max_loras + 1) * lora_params_per_layer(shape, engine.max_lora_rank) * dtype_bytes,
        adapter_rank=adapter_rank,
        adapter_host_bytes=shape.num_layers * lora_params_per_layer(shape, adapter_rank) * dtype_bytes,
        lora_parameters=shape.num_layers * lora_params_per_layer(shape, adapter_rank),
    )

"""The engine's configuration: one object, built once, passed explicitly.

Owns: every tunable of the base model, the LoRA slots, the KV cache and the scheduler, with their
defaults and bounds. It must not read flags or the environment itself; the CLI does that.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """Everything the engine needs to load the base model and run steps.

    Args:
        model: a local Hugging Face checkpoint directory (config, safetensors weights, tokenizer).
        dtype: weight and activation dtype; `auto` takes bfloat16 on CUDA and float32 on CPU.
        device: `auto` takes CUDA when available.
        quantize: bitsandbytes quantization of the base linears; adapters stay in `dtype`.
        max_loras: device slots, i.e. distinct adapters one step may mix.
        max_lora_rank: the slot stacks' rank; a larger adapter is refused.
        max_num_seqs: cap on sequences running in one step.
        max_num_batched_tokens: token budget of one step (decodes first, then prefill chunks).
        max_model_len: prompt plus generated tokens of one sequence.
        block_size: tokens per KV-cache block.
        num_kv_blocks: KV-cache blocks; by default enough for `max_num_seqs` full-length sequences.
        logprobs_mode: what per-token logprobs carry; `raw_logits` exposes the logits themselves.
        max_slot_bypass: how many later adapter requests may be admitted ahead of one that waits
            for a slot before admission becomes strictly first-come (no starvation).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantize: Literal["none", "nf4", "int8"] = "none"
    max_loras: int = Field(default=8, ge=1, le=4096)
    max_lora_rank: int = Field(default=64, ge=1, le=1024)
    max_num_seqs: int = Field(default=32, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=16)
    max_model_len: int | None = Field(default=None, ge=2)
    block_size: int = Field(default=16, ge=1)
    num_kv_blocks: int | None = Field(default=None, ge=1)
    logprobs_mode: Literal["raw_logprobs", "raw_logits"] = "raw_logprobs"
    max_slot_bypass: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.quantize != "none" and self.dtype == "float16" and self.device == "cpu":
            raise ValueError("quantized bases on CPU need float32 compute: use --dtype float32 or auto")
        return self

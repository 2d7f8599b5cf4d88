"""Configuration: one object per layer, built once, passed explicitly.

Owns: `EngineConfig` (every tunable of the base model, the LoRA slots, the KV cache and the
scheduler) and `ServerConfig` (the HTTP server around an engine), with their defaults and bounds.
It must not read flags or the environment itself; the CLI does that.
"""

from pathlib import Path
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
        max_queue: requests that may wait for admission; past it `add_request` raises `QueueFull`.
            None means unbounded.
        enable_lora: False serves the model as it is: no LoRA wrappers, no per-step LoRA cost, and
            adapters are refused (a server of one merged adapter).
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
    max_queue: int | None = Field(default=None, ge=0)
    enable_lora: bool = True

    def model_len(self, max_position_embeddings: int | None) -> int:
        """Tokens per sequence: `max_model_len`, else the model's positions, at most 4096."""
        return self.max_model_len or min(max_position_embeddings or 4096, 4096)

    def kv_blocks(self, model_len: int) -> int:
        """KV-cache blocks: `num_kv_blocks`, else enough for `max_num_seqs` sequences of `model_len`."""
        return self.num_kv_blocks or self.max_num_seqs * -(-model_len // self.block_size)

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.quantize != "none" and self.dtype == "float16" and self.device == "cpu":
            raise ValueError("quantized bases on CPU need float32 compute: use --dtype float32 or auto")
        return self


class ServerConfig(BaseModel):
    """The HTTP server: where it listens, where adapters live, who may call it.

    Args:
        engine: the engine it owns.
        served_model_name: the id of the base model in the API; the model directory's name by default.
        adapters: the adapter store directory (created when missing).
        host / port: where to listen.
        max_adapter_bytes: the largest adapter upload accepted, in bytes.
        api_keys: a TOML file of keys, tenants and roles; None leaves the server open.
        lora_roots: directories `POST /v1/load_lora_adapter` may read from; the store by default.
        drain_timeout: seconds SIGTERM waits for running requests before exiting.
        retry_after: seconds a 429 or 503 tells the client to wait.
        merge_adapter: serve this store adapter merged into the base, under the adapter's name,
            with the LoRA path off; the store is not served.
        metrics_compat: `vllm` also exports vLLM's metric names for queue depth, KV-cache use and
            adapters in use, for routers written for vLLM (the Inference Gateway's endpoint picker).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig
    served_model_name: str | None = None
    adapters: Path = Path("adapters")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_adapter_bytes: int = Field(default=1 << 30, ge=1)
    api_keys: Path | None = None
    lora_roots: tuple[Path, ...] = ()
    drain_timeout: float = Field(default=30.0, ge=0)
    retry_after: int = Field(default=1, ge=0)
    merge_adapter: str | None = None
    metrics_compat: Literal["none", "vllm"] = "none"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.merge_adapter or Path(self.engine.model).resolve().name

    @property
    def allowed_lora_roots(self) -> tuple[Path, ...]:
        return self.lora_roots or (self.adapters,)

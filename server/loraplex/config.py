"""Configuration: one object per layer, built once, passed explicitly.

Owns: `EngineConfig` (every tunable of the base model, the LoRA slots, the KV cache and the
scheduler) and `ServerConfig` (the HTTP server around an engine): each field's default, bounds
and one-line description, written here once. The `loraplex serve` flags, `loraplex plan` and the
Ray app are derived from these fields (see cli_options.py), so a default never has a second home.
It must not read flags or the environment itself; the CLI does that.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1 << 20


class EngineConfig(BaseModel):
    """Everything the engine needs to load the base model and run steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hugging Face checkpoint directory of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight and activation dtype; auto is bfloat16 on CUDA and float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto takes CUDA when present.")
    quantize: Literal["none", "nf4", "int8"] = Field(
        default="none", description="bitsandbytes quantization of the base linears; adapters stay in dtype."
    )
    max_loras: int = Field(default=8, ge=1, le=4096, description="Device slots: distinct adapters one step may mix.")
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="Rank of the slot stacks; larger adapters are refused.")
    max_num_seqs: int = Field(default=32, ge=1, le=4096, description="Sequences running in one step at most.")
    max_num_batched_tokens: int = Field(
        default=512, ge=16, le=1 << 20, description="Token budget of one step; longer prompts are prefilled in chunks."
    )
    max_model_len: int | None = Field(
        default=None, ge=2, le=1 << 20,
        description="Prompt plus generated tokens of one sequence (default: the model's, at most 4096).",
    )  # fmt: skip
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(
        default=None, ge=1, le=1 << 24,
        description="KV-cache blocks; wins over the byte rules (default: from kv_cache_bytes or gpu_memory_utilization).",
    )  # fmt: skip
    kv_cache_bytes: int | None = Field(
        default=None, ge=1, le=1 << 44,
        description=(
            "KV-cache byte budget "
            "(default: on CUDA what gpu_memory_utilization leaves, on CPU max_num_seqs sequences of max_model_len)."
        ),
    )  # fmt: skip
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="Share of the GPU's memory for weights, a step's activations and the KV cache (CUDA only).",
    )  # fmt: skip
    logprobs_mode: Literal["raw_logprobs", "raw_logits"] = Field(
        default="raw_logprobs", description="What per-token logprobs carry; raw_logits returns the logits themselves."
    )
    max_slot_bypass: int | None = Field(
        default=None, ge=0, le=1 << 20,
        description="How often later requests may pass one waiting for a slot (default: max_num_seqs).",
    )  # fmt: skip
    max_queue: int | None = Field(
        default=256, ge=1, le=1 << 20,
        description="Requests waiting for admission at most; past it, 429. None (Python only) is unbounded.",
    )  # fmt: skip
    enable_lora: bool = Field(
        default=True, description="False serves the model as it is: no LoRA wrappers or slots, adapters refused."
    )
    linear_backend: Literal["auto", "reference"] = Field(
        default="auto",
        description="Base linears: auto prepacks unquantized CPU weights for oneDNN; reference runs torch's linear.",
    )
    kernel_backend: Literal["auto", "reference", "triton"] = Field(
        default="auto",
        description="Attention and LoRA ops: auto runs Triton kernels on CUDA and the PyTorch ops on CPU; the others force one.",
    )
    cuda_graphs: bool = Field(
        default=False,
        description="Replay decode steps from CUDA graphs, one per batch-size bucket (Triton kernels on CUDA; not yet verified on a GPU).",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV blocks of a prompt prefix already computed for the same adapter version (same outputs).",
    )
    prefix_cache_scope: Literal["tenant", "global"] = Field(
        default="tenant",
        description="Who reuses a cached prefix: tenant, only the tenant whose request computed it (no tenant can time "
        "another's prompts); global, every tenant calling the same adapter version (more hits on a shared system prompt).",
    )
    lora_strategy: Literal["auto", "dense", "gather", "segment"] = Field(
        default="auto",
        description="How a step's LoRA deltas are computed: auto picks the cheapest per layer; the others force one.",
    )

    scheduling: Literal["fair", "fcfs"] = Field(
        default="fair",
        description="Admission order: fair serves the least-served tenant first (S-LoRA's virtual token counter); fcfs by arrival.",
    )
    tenant_weights: dict[str, float] = Field(
        default={},
        description="Each tenant's share of a busy server under fair scheduling (the keys file's weights; not a flag).",
    )
    max_cpu_lora_bytes: int = Field(
        default=4 << 30, ge=0, le=1 << 44,
        description="Host tier: bytes of adapters kept in host memory; the least recently used idle ones are evicted past it.",
    )  # fmt: skip
    max_cpu_loras: int | None = Field(
        default=None, ge=0, le=1 << 24,
        description="Host tier: adapters kept in host memory at most, beside the byte bound (default: no count bound).",
    )  # fmt: skip
    lora_loader_threads: int = Field(
        default=2, ge=1, le=64, description="Threads reading adapters from disk into host memory, off the engine's step."
    )
    pin_adapters: tuple[str, ...] = Field(
        default=(), description="Adapter names kept in host memory for good, read when registered (repeatable)."
    )

    def model_len(self, max_position_embeddings: int | None) -> int:
        """Tokens per sequence: `max_model_len`, else the model's positions, at most 4096."""
        return self.max_model_len or min(max_position_embeddings or 4096, 4096)

    def kv_blocks(self, model_len: int, block_bytes: int) -> int:
        """KV-cache blocks on CPU: `num_kv_blocks`, else what `kv_cache_bytes` holds, else `max_num_seqs` sequences."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes // block_bytes
        return self.max_num_seqs * -(-model_len // self.block_size)

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.cuda_graphs and (self.device == "cpu" or self.kernel_backend == "reference"):
            raise ValueError("--cuda-graphs captures the Triton kernels on CUDA: it needs CUDA and --kernel-backend auto or triton")
        if self.kernel_backend == "triton" and self.lora_strategy != "auto":
            raise ValueError(f"--lora-strategy {self.lora_strategy} forces a PyTorch op; the Triton kernels pick their own")
        if self.quantize != "none" and self.dtype == "float16" and self.device == "cpu":
            raise ValueError("quantized bases on CPU need float32 compute: use --dtype float32 or auto")
        return self


class ServerConfig(BaseModel):
    """The HTTP server around one engine: where it listens, where adapters live, who may call it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # errors never show api_key

    engine: EngineConfig
    served_model_name: str | None = Field(
        default=None, description="The base model's id in the API (default: the model directory's name)."
    )
    adapters: Path = Field(default=Path("adapters"), description="Adapter store directory (created when missing).")
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    max_adapter_bytes: int = Field(
        default=1 << 30, ge=1, le=1 << 40, description="Largest adapter weights file accepted (uploads and paths), in bytes."
    )
    max_request_bytes: int = Field(
        default=16 * MIB, ge=1024, le=1 << 32,
        description="Largest JSON request body, in bytes; checked before the body is read.",
    )  # fmt: skip
    api_keys: Path | None = Field(default=None, description="TOML file of API keys, tenants and roles (default: open).")
    lora_roots: tuple[Path, ...] = Field(
        default=(), description="Directories /v1/load_lora_adapter may read (default: the store)."
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds SIGTERM waits for running requests before cutting them."
    )
    retry_after: int = Field(default=1, ge=0, le=3600, description="Seconds a 429 or 503 tells the client to wait.")
    merge_adapter: str | None = Field(
        default=None, description="Serve this store adapter merged into the base, under its name, with LoRA off."
    )
    metrics_compat: Literal["none", "vllm"] = Field(
        default="none", description="vllm also exports vLLM's metric names (for the Inference Gateway)."
    )
    metrics_auth: Literal["open", "key"] = Field(
        default="open",
        description="key: GET /metrics needs an admin or metrics key (it shows tenant and adapter names).",
    )
    chat_template_timeout: float = Field(
        default=2.0, gt=0, le=60, description="Seconds one chat template may take to render before a 400."
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        default="auto",
        description="The format tool calls are read from and constrained to; auto picks it from the chat template's text.",
    )
    store_poll_interval: float = Field(
        default=2.0, ge=0, le=3600,
        description="Seconds between looks at the store for adapters other replicas changed (0: never).",
    )  # fmt: skip
    engine_process: bool = Field(
        default=True,
        description="Run the engine in a process of its own, apart from the HTTP side's GIL (off: on a server thread).",
    )
    lora_modules: tuple[str, ...] = Field(
        default=(),
        description="Adapters served from start-up, shared, as vLLM's NAME=PATH (repeatable); a bad one stops start-up.",
    )
    api_key: str | None = Field(
        default=None, repr=False,
        description="One admin key, for the simple case beside --api-keys (default: none); never logged.",
    )  # fmt: skip

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.merge_adapter or Path(self.engine.model).resolve().name

    @property
    def allowed_lora_roots(self) -> tuple[Path, ...]:
        return self.lora_roots or (self.adapters,)

    def lora_module_paths(self) -> list[tuple[str, Path]]:
        """`lora_modules` as (name, directory) pairs; raises ValueError naming a malformed entry."""
        pairs = []
        for entry in self.lora_modules:
            name, equals, path = entry.partition("=")
            if not equals or not name.strip() or not path.strip():
                raise ValueError(f"--lora-modules {entry!r}: expected NAME=PATH")
            pairs.append((name.strip(), Path(path.strip())))
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"--lora-modules names {', '.join(repeated)} more than once")
        return pairs

    @model_validator(mode="after")
    def _check(self) -> "ServerConfig":
        if self.api_key is not None and self.api_keys is not None:
            raise ValueError("give --api-key or an --api-keys file, not both (the file can hold that key too)")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key must be a string of at least 8 characters")  # the key itself is never shown
        if self.metrics_auth == "key" and self.api_keys is None and self.api_key is None:
            raise ValueError("--metrics-auth key needs --api-keys or --api-key to check keys against")
        if self.lora_modules and self.merge_adapter is not None:
            raise ValueError("--lora-modules serves adapters; --merge-adapter turns LoRA off")
        self.lora_module_paths()
        return self

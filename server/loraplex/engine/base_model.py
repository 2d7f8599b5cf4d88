"""Loading the one resident base model and its tokenizer.

Owns: resolving dtype and device, bitsandbytes quantization, and the check that the checkpoint's
architecture is one whose decoder layers the runner knows how to drive. It never changes weights
after loading: adapters live beside the base in slot stacks, never inside it.
"""

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from loraplex.config import EngineConfig
from loraplex.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PACKED_NF4_BLOCK_N = 32  # bitsandbytes' packed CPU nf4 kernel takes out_features in blocks of 32

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """The resident base: the Hugging Face model, its tokenizer, and where and how it runs."""

    model: PreTrainedModel
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    quantize: str
    name: str
    warnings: list[str] = field(default_factory=list)  # what an operator should know about how it runs


def resolve_device(device: str) -> torch.device:
    """`auto` means CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, quantize: str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on CPU; quantized bases on CPU compute in float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _quantization_config(quantize: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _check_checkpoint(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a model directory: config.json is missing")
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; loraplex serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def load_base_model(config: EngineConfig) -> BaseModel:
    """Load the checkpoint named by `config.model` once, in eval mode, on its device.

    Args:
        config: the engine configuration; `model`, `dtype`, `device` and `quantize` are read.

    Returns:
        The resident base model with its tokenizer.
    """
    path = Path(config.model)
    _check_checkpoint(path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, config.quantize)
    quantization = _quantization_config(config.quantize, dtype)
    if config.quantize == "int8":
        # bitsandbytes warns on every int8 matmul that float32 inputs are cast; that is expected here.
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=str(device) if quantization is not None else None,
        quantization_config=quantization,
    )
    if quantization is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    notes = []
    if config.quantize == "nf4" and device.type == "cpu":
        unpacked = _route_unpackable_nf4_layers(model)
        if unpacked:
            notes.append(
                f"{len(unpacked)} nf4 layers have widths bitsandbytes' packed CPU kernel cannot take (out_features a "
                f"multiple of {PACKED_NF4_BLOCK_N}, in_features of the quantization block); they run on its generic "
                f"4-bit path instead: {', '.join(unpacked[:4])}{', ...' if len(unpacked) > 4 else ''}"
            )
    for note in notes:
        log.warning(note)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        quantize=config.quantize,
        name=path.name,
        warnings=notes,
    )


def _route_unpackable_nf4_layers(model: PreTrainedModel) -> list[str]:
    """Send nf4 layers the packed AVX512-BF16 CPU kernel cannot take to bitsandbytes' generic path.

    That kernel repacks each weight on its first forward and fails (for every request, forever)
    unless out_features is a multiple of 32 and in_features of the quantization block; bitsandbytes
    keeps a generic dequantize-and-matmul path for any shape, chosen per layer by this flag.

    Returns:
        The names of the layers rerouted.
    """
    import bitsandbytes as bnb

    rerouted = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = module.weight.quant_state
            out_features, in_features = state.shape
            if out_features % PACKED_NF4_BLOCK_N or in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False
                rerouted.append(name)
    return rerouted

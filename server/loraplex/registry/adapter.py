"""A LoRA adapter read from PEFT files and validated against the base model.

Owns: reading `adapter_config.json` + `adapter_model.safetensors` (safetensors only: never
`torch.load`, never pickle), PEFT's scaling semantics (`alpha / r`, `alpha / sqrt(r)` with rslora,
`rank_pattern` / `alpha_pattern`), and every validation error, each naming its problem. It knows
nothing of device slots (slots.py) or of the on-disk store.
"""

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from loraplex.errors import AdapterInvalid, AdapterMalformed, AdapterNotFound

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

_PEFT_PREFIX = "base_model.model."
# "<module>.lora_A.weight", or "<module>.lora_A.<adapter name>.weight" as some tools save it.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class ModuleShape:
    """What the base offers one LoRA target: a wrapped linear's input and output widths."""

    in_features: int
    out_features: int


@dataclass
class LoraWeights:
    """One module's LoRA pair, exactly as trained."""

    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class LoraAdapter:
    """A validated adapter in host memory, ready to be copied into a device slot.

    `uid` is unique to this loaded version: replacing an adapter makes a new object with a new uid,
    so requests already running keep the version they started with.
    """

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, LoraWeights]
    nbytes: int
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: a key matches a module name's dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _refuse_unsupported(config: Mapping) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterInvalid(f"only LoRA adapters are supported; this adapter has peft_type={peft_type or 'missing'}")
    if config.get("use_dora"):
        raise AdapterInvalid("DoRA adapters (use_dora=true) are not supported yet")
    if config.get("modules_to_save"):
        raise AdapterInvalid(
            f"modules_to_save={config['modules_to_save']} is not supported: an adapter may only carry LoRA A/B pairs"
        )
    if config.get("fan_in_fan_out"):
        raise AdapterInvalid("fan_in_fan_out=true (Conv1D layers) is not supported")
    if config.get("lora_bias"):
        raise AdapterInvalid("lora_bias=true is not supported")
    if config.get("trainable_token_indices"):
        raise AdapterInvalid("trainable_token_indices is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterInvalid(f"bias={config['bias']!r} is not supported; only bias='none' adapters are accepted")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterInvalid(f"adapter_config.json: {key} must be a positive number, got {value!r}")


def _pair_tensors(tensors: Mapping[str, torch.Tensor], base_modules: Mapping[str, ModuleShape]) -> dict:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise AdapterInvalid(f"tensor {key} is a DoRA magnitude vector; DoRA adapters are not supported yet")
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match is None:
            raise AdapterInvalid(f"tensor {key} is not a LoRA A/B weight; only lora_A and lora_B tensors are accepted")
        module = match["module"]
        if module not in base_modules:
            raise AdapterInvalid(
                f"tensor {key} targets module {module}, which the base model does not have as a LoRA target "
                "(supported: q/k/v/o and gate/up/down projections of the decoder layers)"
            )
        pairs.setdefault(module, {})[match["which"]] = tensor
    if not pairs:
        raise AdapterInvalid("the adapter holds no LoRA tensors, so it matches no module of the base model")
    for module, pair in pairs.items():
        missing = {"A", "B"} - pair.keys()
        if missing:
            raise AdapterInvalid(f"module {module} has lora_{missing.pop()} missing")
    return pairs


def build_adapter(
    name: str,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    base_modules: Mapping[str, ModuleShape],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Validate a PEFT LoRA (config + tensors) against the base and return it ready for slots.

    Args:
        name: the adapter's name, as requests will select it.
        config: the parsed `adapter_config.json`.
        tensors: the safetensors contents, keyed as PEFT saves them.
        base_modules: every wrapped module of the base, by qualified name, with its shape.
        max_rank: the slot rank; a larger adapter is refused.
        dtype: the dtype adapters are served in (the base's compute dtype).

    Raises:
        AdapterInvalid: with a message naming the first problem found.
    """
    _refuse_unsupported(config)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraWeights] = {}
    for module, pair in sorted(_pair_tensors(tensors, base_modules).items()):
        lora_a, lora_b = pair["A"], pair["B"]
        shape = base_modules[module]
        rank = int(_pattern_value(rank_pattern, module, config["r"]))
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise AdapterInvalid(f"module {module}: lora_A and lora_B must be matrices")
        if rank > max_rank:
            raise AdapterInvalid(f"module {module}: rank {rank} exceeds max_lora_rank {max_rank}")
        if tuple(lora_a.shape) != (rank, shape.in_features):
            raise AdapterInvalid(
                f"module {module}: lora_A has shape {list(lora_a.shape)}, expected [{rank}, {shape.in_features}]"
            )
        if tuple(lora_b.shape) != (shape.out_features, rank):
            raise AdapterInvalid(
                f"module {module}: lora_B has shape {list(lora_b.shape)}, expected [{shape.out_features}, {rank}]"
            )
        for which, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not tensor.is_floating_point():
                raise AdapterInvalid(f"module {module}: {which} has dtype {tensor.dtype}, expected a float dtype")
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterInvalid(f"module {module}: {which} holds non-finite values (NaN or Inf)")
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = LoraWeights(lora_a.to(dtype), lora_b.to(dtype), scaling)
    targets = sorted({module.rsplit(".", 1)[-1] for module in modules})
    return LoraAdapter(
        name=name,
        rank=max(weights.rank for weights in modules.values()),
        alpha=float(config["lora_alpha"]),
        use_rslora=use_rslora,
        target_modules=targets,
        modules=modules,
        nbytes=sum(t.numel() * t.element_size() for w in modules.values() for t in (w.lora_a, w.lora_b)),
    )


def parse_config(raw: bytes | str) -> dict:
    """Parse `adapter_config.json` text, refusing anything that is not a JSON object."""
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterMalformed(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterMalformed(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _has_safetensors_header(raw: bytes) -> bool:
    """Whether `raw` starts as safetensors does: a little-endian u64 length, then that much JSON."""
    header_length = int.from_bytes(raw[:8], "little")
    return len(raw) > 8 and header_length <= len(raw) - 8 and raw[8:9] == b"{"


def parse_weights(raw: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; a pickle or any other format is refused, never unpickled.

    A safetensors header length can start with the same byte as a pickle (0x80) or a zip (`PK`),
    so the pickle message is only given to files that are not safetensors-shaped.
    """
    pickle_magic = raw[:1] == b"\x80" or raw[:4] == b"PK\x03\x04"
    if pickle_magic and not _has_safetensors_header(raw):
        raise AdapterMalformed(f"{WEIGHTS_FILE} looks like a pickle/torch.save file; only safetensors is accepted")
    try:
        return load_safetensors_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterMalformed(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None


def read_adapter_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory's config and tensors (safetensors only).

    Raises:
        AdapterNotFound: the directory or its config is missing.
        AdapterInvalid: the weights are pickled, missing or malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterNotFound(f"adapter directory {path} does not exist")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterNotFound(f"{path} has no {CONFIG_FILE}")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickled:
            raise AdapterMalformed(
                f"{path} holds {pickled[0]}, a pickle file; loraplex reads safetensors only "
                "(save with safe_serialization=True)"
            )
        raise AdapterMalformed(f"{path} has no {WEIGHTS_FILE}")
    return parse_config(config_path.read_bytes()), parse_weights(weights_path.read_bytes())


def load_adapter(
    path: Path,
    name: str,
    base_modules: Mapping[str, ModuleShape],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Read and validate the PEFT adapter directory at `path` (see `build_adapter`)."""
    config, tensors = read_adapter_dir(path)
    return build_adapter(name, config, tensors, base_modules, max_rank, dtype)

"""A LoRA adapter read from PEFT files and validated against the base model.

Owns: parsing `adapter_config.json` + `adapter_model.safetensors` as files.py reads them
(safetensors only: never `torch.load`, never pickle), pairing the tensors with the base's modules
(each module at most once, only modules the config selects, as PEFT loads them), the effective
weights' checks, and every validation error, each naming its problem; what the config itself may
say is config.py's. It knows nothing of device slots (engine/slots.py) or of the on-disk store (service/store.py).
"""

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from loraplex.errors import AdapterInvalid, AdapterMalformed
from loraplex.lora.config import ModuleMatcher, check_depth, parse_settings
from loraplex.lora.files import CONFIG_FILE, WEIGHTS_FILE, read_adapter_files

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


MAX_KEY_CHARS = 512  # a tensor name; PEFT's are under 100 characters
# Largest |value| of A and of scaling * B in the slot stacks' dtype: trained adapters stay far below
# 1, and a value this large already risks overflowing a half-precision delta.
MAX_EFFECTIVE_WEIGHT = 1e4


def _pair_tensors(
    tensors: Mapping[str, torch.Tensor], base_modules: Mapping[str, ModuleShape], matcher: ModuleMatcher
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """Each module's (key, tensor) for A and B; refuses what PEFT would not load as this adapter's."""
    if len(tensors) > 2 * len(base_modules):
        raise AdapterInvalid(f"the adapter holds {len(tensors)} tensors; this base has {len(base_modules)} LoRA targets")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if len(key) > MAX_KEY_CHARS:
            raise AdapterInvalid(f"a tensor name is longer than {MAX_KEY_CHARS} characters")
        if "lora_magnitude_vector" in key:
            raise AdapterInvalid(f"tensor {key} is a DoRA magnitude vector; DoRA adapters are not supported yet")
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match is None:
            raise AdapterInvalid(f"tensor {key} is not a LoRA A/B weight; only lora_A and lora_B tensors are accepted")
        module, which = match["module"], match["which"]
        if module not in base_modules:
            raise AdapterInvalid(
                f"tensor {key} targets module {module}, which the base model does not have as a LoRA target "
                "(supported: q/k/v/o and gate/up/down projections of the decoder layers)"
            )
        if which in pairs.get(module, {}):
            raise AdapterInvalid(f"tensors {pairs[module][which][0]} and {key} are both lora_{which} of module {module}")
        if not matcher.selects(module):
            raise AdapterInvalid(
                f"tensor {key} is for module {module}, which the adapter's own target_modules, exclude_modules and "
                "layers_to_transform do not select (PEFT would not load it)"
            )
        pairs.setdefault(module, {})[which] = (key, tensor)
    if not pairs:
        raise AdapterInvalid("the adapter holds no LoRA tensors, so it matches no module of the base model")
    for module, pair in pairs.items():
        missing = {"A", "B"} - pair.keys()
        if missing:
            raise AdapterInvalid(f"module {module} has lora_{missing.pop()} missing")
    return pairs


def _effective(module: str, which: str, tensor: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0) -> torch.Tensor:
    """`tensor * scaling` as the slot stacks will hold it, checked finite and within MAX_EFFECTIVE_WEIGHT."""
    if not tensor.is_floating_point():
        raise AdapterInvalid(f"module {module}: {which} has dtype {tensor.dtype}, expected a float dtype")
    effective = tensor.to(torch.float32).mul(scaling).to(dtype)
    if not bool(torch.isfinite(effective).all()):
        scaled = "" if scaling == 1.0 else f" once scaled by {scaling:g}"
        raise AdapterInvalid(f"module {module}: {which} holds non-finite values{scaled} (NaN or Inf in {dtype})")
    largest = float(effective.abs().max()) if effective.numel() else 0.0
    if largest > MAX_EFFECTIVE_WEIGHT:
        raise AdapterInvalid(
            f"module {module}: {which} scaled by {scaling:g} reaches {largest:.3g}; values beyond "
            f"{MAX_EFFECTIVE_WEIGHT:g} are refused (check lora_alpha and r)"
        )
    return effective


def build_adapter(
    name: str,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    base_modules: Mapping[str, ModuleShape],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Validate a PEFT LoRA (config + tensors) against the base and return it ready for slots.

    The weights are checked as the slots will hold them: A, and B times the module's scaling
    (`alpha / r` or rsLoRA's `alpha / sqrt(r)`, with rank/alpha patterns), in `dtype`, all finite and
    within MAX_EFFECTIVE_WEIGHT, so one tenant's adapter cannot put NaN or Inf into a shared step.

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
    settings = parse_settings(config)
    matcher = ModuleMatcher(settings)
    modules: dict[str, LoraWeights] = {}
    for module, pair in sorted(_pair_tensors(tensors, base_modules, matcher).items()):
        (_, lora_a), (_, lora_b) = pair["A"], pair["B"]
        shape = base_modules[module]
        rank, alpha = matcher.rank(module), matcher.alpha(module)
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
        scaling = settings.scaling(rank, alpha)
        _effective(module, "lora_B", lora_b, dtype, scaling)
        modules[module] = LoraWeights(_effective(module, "lora_A", lora_a, dtype), lora_b.to(dtype), scaling)
    targets = sorted({module.rsplit(".", 1)[-1] for module in modules})
    return LoraAdapter(
        name=name,
        rank=max(weights.rank for weights in modules.values()),
        alpha=settings.alpha,
        use_rslora=settings.use_rslora,
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
    except RecursionError:
        raise AdapterMalformed(f"{CONFIG_FILE} is nested too deeply to parse") from None
    if not isinstance(config, dict):
        raise AdapterMalformed(f"{CONFIG_FILE} must hold a JSON object")
    check_depth(config)
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


def read_adapter_dir(
    path: Path, max_weights_bytes: int | None = None, roots: tuple[Path, ...] | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory's config and tensors (safetensors only), through `read_adapter_files`.

    Args:
        path: the adapter directory.
        max_weights_bytes: the largest weights file read; None reads any size.
        roots: directories it (and every file it links to) must lie inside; None trusts any place.

    Raises:
        AdapterNotFound: the directory or its config is missing.
        AdapterTooLarge: the weights are over `max_weights_bytes`.
        Forbidden: the directory or a file it links to is outside `roots`.
        AdapterInvalid: the weights are pickled, missing or malformed.
    """
    files = read_adapter_files(path, roots, max_weights_bytes, with_chat_template=False)
    return parse_config(files.config), parse_weights(files.weights)


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

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
from loraplex.lora.config import LoraSettings, ModuleMatcher, check_depth, parse_settings
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


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter version's files are, to be read when a request needs it (not before).

    `version` is the directory's `directory_version` when it was indexed; a read that finds another
    version refuses it, so a replaced or deleted adapter is never served under the old version's uid.
    """

    path: str
    version: str
    roots: tuple[str, ...] | None = None  # directories every file must lie inside; None: the trusted store
    max_bytes: int | None = None  # the largest weights file read


@dataclass
class LoraAdapter:
    """A validated adapter version: its facts, and its weights in host memory or where to read them.

    `uid` is unique to this version: replacing an adapter makes a new object with a new uid, so
    requests already running keep the version they started with. `modules` holds the weights of
    an adapter built in memory; an indexed one (`modules` None) is read from `source` on demand.
    """

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, LoraWeights] | None
    nbytes: int  # A and B of every module in the serving dtype: what a host or device copy takes
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: AdapterSource | None = None

    def on_disk(self, source: AdapterSource) -> "LoraAdapter":
        """This version's facts without its weights, to be read from `source` when needed."""
        return LoraAdapter(
            self.name, self.rank, self.alpha, self.use_rslora, list(self.target_modules), None, self.nbytes, self.uid, source
        )


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor: enough to validate an adapter without reading it."""

    shape: tuple[int, ...]
    dtype: str
    floating: bool


@dataclass(frozen=True)
class ModulePlan:
    """One module's validated LoRA pair, by tensor name: what `build_adapter` reads the values of."""

    key_a: str
    key_b: str
    rank: int
    scaling: float


MAX_KEY_CHARS = 512  # a tensor name; PEFT's are under 100 characters
# Largest |value| of A and of scaling * B in the slot stacks' dtype: trained adapters stay far below
# 1, and a value this large already risks overflowing a half-precision delta.
MAX_EFFECTIVE_WEIGHT = 1e4


def _pair_tensors(
    tensors: Mapping[str, TensorInfo], base_modules: Mapping[str, ModuleShape], matcher: ModuleMatcher
) -> dict[str, dict[str, tuple[str, TensorInfo]]]:
    """Each module's (key, tensor) for A and B; refuses what PEFT would not load as this adapter's."""
    if len(tensors) > 2 * len(base_modules):
        raise AdapterInvalid(f"the adapter holds {len(tensors)} tensors; this base has {len(base_modules)} LoRA targets")
    pairs: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for key, tensor in sorted(tensors.items()):  # by name: the first problem is the same for a header and a read
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


# torch dtypes by the names safetensors headers give them, so both paths name a dtype alike
_SAFETENSORS_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64",
}  # fmt: skip


def tensor_infos(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """What `plan_modules` checks of loaded tensors: their shapes and dtypes (named as in a safetensors header)."""
    return {
        key: TensorInfo(tuple(t.shape), _SAFETENSORS_NAMES.get(t.dtype, str(t.dtype)), t.is_floating_point())
        for key, t in tensors.items()
    }


def plan_modules(
    config: Mapping, tensors: Mapping[str, TensorInfo], base_modules: Mapping[str, ModuleShape], max_rank: int
) -> tuple[LoraSettings, dict[str, ModulePlan]]:
    """Every check of a PEFT LoRA that needs no tensor values: config, names, pairing, ranks, shapes, dtypes.

    Args:
        config: the parsed `adapter_config.json`.
        tensors: each tensor's shape and dtype, keyed as PEFT saves them (a header or loaded tensors).
        base_modules: every wrapped module of the base, by qualified name, with its shape.
        max_rank: the slot rank; a larger adapter is refused.

    Returns:
        The parsed settings, and each module's plan, sorted by module name.

    Raises:
        AdapterInvalid: with a message naming the first problem found.
    """
    settings = parse_settings(config)
    matcher = ModuleMatcher(settings)
    plans: dict[str, ModulePlan] = {}
    for module, pair in sorted(_pair_tensors(tensors, base_modules, matcher).items()):
        (key_a, lora_a), (key_b, lora_b) = pair["A"], pair["B"]
        shape = base_modules[module]
        rank, alpha = matcher.rank(module), matcher.alpha(module)
        if len(lora_a.shape) != 2 or len(lora_b.shape) != 2:
            raise AdapterInvalid(f"module {module}: lora_A and lora_B must be matrices")
        if rank > max_rank:
            raise AdapterInvalid(f"module {module}: rank {rank} exceeds max_lora_rank {max_rank}")
        if lora_a.shape != (rank, shape.in_features):
            raise AdapterInvalid(
                f"module {module}: lora_A has shape {list(lora_a.shape)}, expected [{rank}, {shape.in_features}]"
            )
        if lora_b.shape != (shape.out_features, rank):
            raise AdapterInvalid(
                f"module {module}: lora_B has shape {list(lora_b.shape)}, expected [{shape.out_features}, {rank}]"
            )
        for which, info in (("lora_B", lora_b), ("lora_A", lora_a)):
            if not info.floating:
                raise AdapterInvalid(f"module {module}: {which} has dtype {info.dtype}, expected a float dtype")
        plans[module] = ModulePlan(key_a, key_b, rank, settings.scaling(rank, alpha))
    return settings, plans


def describe_adapter(
    name: str, settings: LoraSettings, plans: Mapping[str, ModulePlan], base_modules: Mapping[str, ModuleShape], dtype: torch.dtype
) -> LoraAdapter:
    """The facts of a planned adapter, without weights (`modules` None; see `LoraAdapter.on_disk`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = sum(
        plan.rank * (base_modules[module].in_features + base_modules[module].out_features) * itemsize
        for module, plan in plans.items()
    )
    return LoraAdapter(
        name=name,
        rank=max(plan.rank for plan in plans.values()),
        alpha=settings.alpha,
        use_rslora=settings.use_rslora,
        target_modules=sorted({module.rsplit(".", 1)[-1] for module in plans}),
        modules=None,
        nbytes=nbytes,
    )


def build_adapter(
    name: str,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    base_modules: Mapping[str, ModuleShape],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Validate a PEFT LoRA (config + tensors) against the base and return it ready for slots.

    Every check `plan_modules` makes, then the weights as the slots will hold them: A, and B times
    the module's scaling (`alpha / r` or rsLoRA's `alpha / sqrt(r)`, with rank/alpha patterns), in
    `dtype`, all finite and within MAX_EFFECTIVE_WEIGHT, so one tenant's adapter cannot put NaN or
    Inf into a shared step.

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
    settings, plans = plan_modules(config, tensor_infos(tensors), base_modules, max_rank)
    modules: dict[str, LoraWeights] = {}
    for module, plan in plans.items():
        lora_a, lora_b = tensors[plan.key_a], tensors[plan.key_b]
        _effective(module, "lora_B", lora_b, dtype, plan.scaling)
        modules[module] = LoraWeights(_effective(module, "lora_A", lora_a, dtype), lora_b.to(dtype), plan.scaling)
    adapter = describe_adapter(name, settings, plans, base_modules, dtype)
    adapter.modules = modules
    return adapter


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

"""Adapters known by their files' headers: indexed at once, their weights read only when needed.

Owns: parsing a safetensors header (bounded: what files.py reads with `header_only`) into each
tensor's shape and dtype; indexing an adapter directory (its config and header, every check of
adapter.py's `plan_modules`, no tensor read; identical configs and headers validated once) into a
`LoraAdapter` without weights and with an `AdapterSource`; and reading an indexed version's weights later (`read_source`), refusing a
directory that no longer holds that version. It knows nothing of tiers, slots or the store's
layout: callers decide when to index and when to read.
"""

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from loraplex.errors import AdapterInvalid, AdapterMalformed, AdapterNotFound
from loraplex.lora.adapter import (
    AdapterSource,
    LoraAdapter,
    ModulePlan,
    ModuleShape,
    TensorInfo,
    build_adapter,
    describe_adapter,
    parse_config,
    parse_weights,
    plan_modules,
)
from loraplex.lora.config import LoraSettings
from loraplex.lora.files import WEIGHTS_FILE, directory_version, read_adapter_files

# safetensors dtype names -> (bytes per element, whether it is a float type)
_DTYPES = {
    "BOOL": (1, False), "U8": (1, False), "I8": (1, False), "U16": (2, False), "I16": (2, False),
    "U32": (4, False), "I32": (4, False), "U64": (8, False), "I64": (8, False),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True), "F16": (2, True), "BF16": (2, True), "F32": (4, True), "F64": (8, True),
}  # fmt: skip
MAX_DIMS = 8
PLAN_MEMO_SIZE = 256  # distinct (config, header) pairs whose validation is remembered (plans only: small)


def parse_header(raw: bytes, file_size: int) -> dict[str, TensorInfo]:
    """Each tensor's shape and dtype from a safetensors header (its 8-byte length, then the JSON).

    Args:
        raw: the header as files.py's `header_only` read returns it.
        file_size: the whole file's size, which every tensor's byte range must lie inside.

    Raises:
        AdapterMalformed: the header is not the JSON object safetensors writes, or a tensor's
            dtype, shape or byte range is impossible.
    """
    try:
        header = json.loads(raw[8:])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise AdapterMalformed(f"{WEIGHTS_FILE} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise AdapterMalformed(f"{WEIGHTS_FILE} is not a valid safetensors file: its header is not an object")
    data_bytes = file_size - len(raw)
    infos = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        infos[key] = _tensor_info(key, entry, data_bytes)
    return infos


def _tensor_info(key: str, entry: object, data_bytes: int) -> TensorInfo:
    def bad(why: str) -> AdapterMalformed:
        return AdapterMalformed(f"{WEIGHTS_FILE} is not a valid safetensors file: tensor {key[:200]!r} {why}")

    if not isinstance(entry, dict):
        raise bad("is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad(f"has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_count(d) for d in shape):
        raise bad("has no valid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise bad("has no valid data_offsets")
    begin, end = offsets
    itemsize, floating = _DTYPES[dtype]
    if not begin <= end <= data_bytes or end - begin != math.prod(shape) * itemsize:
        raise bad("has a byte range that does not fit its shape or the file")
    return TensorInfo(tuple(shape), dtype, floating)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 48


def index_adapter(
    path: str | Path,
    name: str,
    base_modules: Mapping[str, ModuleShape],
    max_rank: int,
    dtype: torch.dtype,
    max_bytes: int | None = None,
    roots: tuple[Path, ...] | None = None,
) -> LoraAdapter:
    """Validate the adapter directory at `path` from its config and header alone (no tensor is read).

    Args:
        path: the adapter directory.
        name: the adapter's name, as requests will select it.
        base_modules: every wrapped module of the base, by qualified name, with its shape.
        max_rank: the slot rank; a larger adapter is refused.
        dtype: the dtype adapters are served in.
        max_bytes: the largest weights file accepted; None takes any size.
        roots: directories it (and every file it links to) must lie inside, now and when it is
            read; None for the trusted store.

    Returns:
        The adapter's facts, `modules` None, and a source naming the version indexed.

    Raises:
        AdapterNotFound, AdapterTooLarge, Forbidden, AdapterInvalid: as `read_adapter_files` and
        `plan_modules` raise them.
    """
    version = _version(path)
    files = read_adapter_files(path, roots, max_bytes, with_chat_template=False, header_only=True)
    shapes = tuple(sorted((module, shape.in_features, shape.out_features) for module, shape in base_modules.items()))
    settings, plans = _plan(files.config, files.weights, files.weights_size, shapes, max_rank)
    adapter = describe_adapter(name, settings, plans, base_modules, dtype)
    source = AdapterSource(str(files.path), version, None if roots is None else tuple(str(r) for r in roots), max_bytes)
    return adapter.on_disk(source)


@functools.lru_cache(maxsize=PLAN_MEMO_SIZE)
def _plan(config: bytes, header: bytes, file_size: int, shapes: tuple, max_rank: int) -> tuple[LoraSettings, dict[str, ModulePlan]]:
    """`plan_modules` of a config and header, remembered: a pure function of its arguments.

    Adapters trained with one recipe on one base have byte-identical configs and headers (same
    names, shapes, dtypes, hence offsets), so a fleet of them is validated once, not once each. A
    refusal raises and is not remembered. The memo holds validated plans only, never weights.
    """
    base_modules = {module: ModuleShape(in_features, out_features) for module, in_features, out_features in shapes}
    return plan_modules(parse_config(config), parse_header(header, file_size), base_modules, max_rank)


def read_source(adapter: LoraAdapter, base_modules: Mapping[str, ModuleShape], max_rank: int, dtype: torch.dtype) -> LoraAdapter:
    """The weights of an indexed version, read from its source and validated in full (`build_adapter`).

    Args:
        adapter: an indexed adapter (`source` set).
        base_modules, max_rank, dtype: as it was indexed with.

    Returns:
        The same version (same uid) with its `modules`.

    Raises:
        AdapterNotFound: the directory no longer holds that version (replaced or deleted since).
        AdapterInvalid: the weights fail a check the header could not make (non-finite or huge
            values), or no longer match what was indexed.
    """
    source = adapter.source
    if source is None:
        raise ValueError(f"adapter {adapter.name!r} has no source to read")
    gone = AdapterNotFound(f"adapter {adapter.name!r} was replaced or deleted before its weights were read")
    if _version(source.path) != source.version:
        raise gone
    roots = None if source.roots is None else tuple(Path(root) for root in source.roots)
    files = read_adapter_files(source.path, roots, source.max_bytes, with_chat_template=False)
    if _version(source.path) != source.version:  # changed while it was read
        raise gone
    loaded = build_adapter(adapter.name, parse_config(files.config), parse_weights(files.weights), base_modules, max_rank, dtype)
    if (loaded.rank, loaded.nbytes, loaded.target_modules) != (adapter.rank, adapter.nbytes, adapter.target_modules):
        raise AdapterInvalid(f"adapter {adapter.name!r} no longer matches what was indexed; re-register it")
    return LoraAdapter(
        adapter.name, adapter.rank, adapter.alpha, adapter.use_rslora, list(adapter.target_modules), loaded.modules,
        adapter.nbytes, adapter.uid, source,
    )  # fmt: skip


def _version(path: str | Path) -> str | None:
    try:
        return directory_version(path)
    except OSError:
        return None

"""Merge one LoRA adapter into the base and write a standard Hugging Face checkpoint.

Owns: `export_merged`, which computes W' = W + scaling * B @ A (in float32) for every weight the
adapter targets, reading the original full-precision checkpoint one tensor at a time and writing
sharded safetensors as it goes, so peak memory stays near one shard, never the resident (possibly
quantized) weights of a server. Config, tokenizer, chat template and generation config are
copied; the result loads with `transformers.AutoModelForCausalLM` alone. With `quantize`, the
merged checkpoint is then loaded quantized by bitsandbytes and saved pre-quantized, so it loads
quantized. It must not touch a running engine.
"""

import json
import math
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file

from loraplex.engine.lora_layer import TARGET_NAMES
from loraplex.errors import ModelLoadError
from loraplex.lora.adapter import LoraAdapter, ModuleShape, build_adapter, read_adapter_dir

WEIGHTS_INDEX = "model.safetensors.index.json"
SKIPPED_FILES = {WEIGHTS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExportReport:
    """What an export did.

    Args:
        out_dir: the written checkpoint.
        merged_modules: how many weights got an adapter delta.
        shards: safetensors files written.
        bytes_written: their total size.
    """

    out_dir: Path
    merged_modules: int
    shards: int
    bytes_written: int


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order; refuses pickled checkpoints."""
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{model_dir} has no model.safetensors (export reads safetensors checkpoints only)")


def tensor_shapes(files: list[Path]) -> dict[str, tuple[list[int], str, Path]]:
    """(shape, dtype name, file) of every tensor, read from the safetensors headers only."""
    shapes = {}
    for path in files:
        with safe_open(path, framework="pt") as reader:
            for key in reader.keys():
                sliced = reader.get_slice(key)
                shapes[key] = (sliced.get_shape(), sliced.get_dtype(), path)
    return shapes


def module_shapes(shapes: dict[str, tuple[list[int], str, Path]]) -> dict[str, ModuleShape]:
    """Every LoRA-targetable linear of the checkpoint, as adapters are validated against."""
    modules = {}
    for key, (shape, _, _) in shapes.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in TARGET_NAMES and len(shape) == 2:
            modules[module] = ModuleShape(in_features=shape[1], out_features=shape[0])
    return modules


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32 and stored in `dtype`.

    Args:
        weight: [out, in] the base weight.
        lora_a: [r, in].
        lora_b: [out, r].
        scaling: alpha / r (or alpha / sqrt(r) with rsLoRA).
        dtype: the stored dtype.
    """
    delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * scaling  # [out, in]
    return (weight.to(torch.float32) + delta).to(dtype)


def plan_shards(shapes: dict, dtype: torch.dtype | None, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per output shard, in checkpoint order, each shard at most `max_shard_bytes`."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, (shape, dtype_name, _) in shapes.items():
        element = dtype.itemsize if dtype is not None else _safetensors_itemsize(dtype_name)
        nbytes = element * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _safetensors_itemsize(dtype_name: str) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    return sizes.get(dtype_name, 4)


def copy_side_files(model_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer, templates and generation config; the config's dtype follows the export's."""
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in SKIPPED_FILES and not path.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(path, out_dir / path.name)
    if dtype is not None:
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_export_adapter(adapter_dir: Path, modules: dict[str, ModuleShape]) -> LoraAdapter:
    """The adapter, validated against the checkpoint's shapes, in float32 for the merge math."""
    config, tensors = read_adapter_dir(adapter_dir)
    return build_adapter(adapter_dir.name, config, tensors, modules, max_rank=1 << 16, dtype=torch.float32)


def write_merged(
    model_dir: Path, shapes: dict, adapter: LoraAdapter, out_dir: Path, dtype: torch.dtype | None, max_shard_bytes: int
) -> ExportReport:
    """Stream the checkpoint (whose `tensor_shapes` are given) tensor by tensor into `out_dir`, merging the adapter's targets."""
    shards = plan_shards(shapes, dtype, max_shard_bytes)
    count = len(shards)
    names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map, merged, written = {}, 0, 0
    with Progress(transient=True) as progress, ExitStack() as files:
        readers = {path: files.enter_context(safe_open(path, framework="pt")) for _, _, path in shapes.values()}
        task = progress.add_task("merging", total=len(shapes))
        for name, keys in zip(names, shards, strict=True):
            tensors = {}
            for key in keys:
                tensor = readers[shapes[key][2]].get_tensor(key)
                weights = adapter.modules.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
                target = dtype if dtype is not None else tensor.dtype
                if weights is not None:
                    tensor = merged_weight(tensor, weights.lora_a, weights.lora_b, weights.scaling, target)
                    merged += 1
                elif tensor.is_floating_point():
                    tensor = tensor.to(target)
                tensors[key] = tensor.contiguous()
                weight_map[key] = name
                progress.advance(task)
            save_file(tensors, out_dir / name, metadata={"format": "pt"})
            written += (out_dir / name).stat().st_size
    if len(shards) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": weight_map}
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    copy_side_files(model_dir, out_dir, dtype)
    return ExportReport(out_dir, merged, len(shards), written)


def quantize_checkpoint(merged_dir: Path, out_dir: Path, quantize: str) -> None:
    """Load the merged checkpoint quantized by bitsandbytes and save it pre-quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if quantize == "nf4":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    device_map = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=quantization, device_map=device_map)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(out_dir)
    for path in merged_dir.iterdir():  # templates and anything else the tokenizer does not write
        if path.is_file() and not (out_dir / path.name).exists() and not path.name.endswith(".safetensors"):
            shutil.copy2(path, out_dir / path.name)


def export_merged(
    model_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "auto",
    quantize: str = "none",
    max_shard_bytes: int = 2 << 30,
) -> ExportReport:
    """Write base + adapter, merged, as a Hugging Face checkpoint at `out_dir`.

    Args:
        model_dir: the base's original full-precision checkpoint (safetensors).
        adapter_dir: a PEFT LoRA adapter directory.
        out_dir: where to write; must not exist or be empty.
        dtype: `auto` keeps each tensor's checkpoint dtype; else float32, bfloat16 or float16.
        quantize: `none`, or `nf4` / `int8` to save the merged model pre-quantized by bitsandbytes.
        max_shard_bytes: the largest safetensors shard written.

    Raises:
        ModelLoadError: the base is not a safetensors checkpoint, is already quantized, or `out_dir` is not empty.
        AdapterInvalid / AdapterMalformed: the adapter cannot be applied to this base.
    """
    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in ("none", "nf4", "int8"):
        raise ValueError(f"quantize must be none, nf4 or int8, got {quantize!r}")
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else None
    if config is None:
        raise ModelLoadError(f"{model_dir} has no config.json")
    if "quantization_config" in config:
        raise ModelLoadError(f"{model_dir} is already quantized; export merges into the original full-precision checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelLoadError(f"{out_dir} is not empty; export writes into a new directory")
    shapes = tensor_shapes(weight_files(model_dir))
    adapter = load_export_adapter(adapter_dir, module_shapes(shapes))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = DTYPES.get(dtype)
    if quantize == "none":
        return write_merged(model_dir, shapes, adapter, out_dir, target, max_shard_bytes)
    with tempfile.TemporaryDirectory(prefix="loraplex-export-") as staging:
        report = write_merged(model_dir, shapes, adapter, Path(staging), target, max_shard_bytes)
        quantize_checkpoint(Path(staging), out_dir, quantize)
    files = list(out_dir.glob("*.safetensors"))
    return ExportReport(out_dir, report.merged_modules, len(files), sum(path.stat().st_size for path in files))

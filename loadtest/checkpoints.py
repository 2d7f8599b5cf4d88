"""Random benchmark checkpoints built on the fly: a base model, its tokenizer, PEFT LoRA adapters.

Owns: model configs by name (tiny and small shapes for this CPU, `0.3b`, a 317M-parameter Llama,
and real architectures such as Llama-3.2-1B and Llama-3-8B, so a GPU can run the same sweep
without downloading weights),
saving a random model of a config (weights drawn from normal(0, 0.02)), a word-level tokenizer
covering the whole vocabulary (benchmark prompts are random token ids, so it only has to load and
decode), and random LoRA adapters in exactly the files PEFT's `save_pretrained` writes. Adapters
are built from the config on the meta device, so an 8B base is never materialised to make them.
Nothing is downloaded; it must not time or run anything.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>")  # ids 0, 1, 2; prompts draw from the ids after them
INIT_STD = 0.02
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-architecture shapes by name; `model_config` turns one into a config.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
    ),
    "0.3b": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 32000


def shape_config(shape: ModelShape) -> dict:
    """A `ModelShape` as config fields."""
    return dict(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
    )


def model_config(name_or_json: str | dict, max_positions: int) -> PretrainedConfig:
    """A config without EOS (so generation runs to `max_tokens` everywhere) from a preset or JSON.

    Args:
        name_or_json: a `MODEL_PRESETS` name, a path to a `config.json` (or a directory holding
            one), an inline JSON object, or a dict of Llama config fields.
        max_positions: `max_position_embeddings` of the result.
    """
    if isinstance(name_or_json, dict):
        fields = dict(name_or_json)
    elif name_or_json in MODEL_PRESETS:
        fields = dict(MODEL_PRESETS[name_or_json])
    elif name_or_json.lstrip().startswith("{"):
        fields = json.loads(name_or_json)
    else:
        path = Path(name_or_json)
        if not path.exists():
            raise ValueError(f"{name_or_json!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a config file")
        fields = AutoConfig.from_pretrained(path).to_dict()
    fields.update(max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model_type = fields.pop("model_type", "llama")
    fields.pop("architectures", None)
    fields.pop("transformers_version", None)
    if model_type == "llama":
        fields.setdefault("tie_word_embeddings", False)
        return LlamaConfig(**fields)
    return AutoConfig.for_model(model_type, **fields)


def make_tokenizer(path: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per id: `<pad> <unk> </s> t3 t4 ... t{vocab_size - 1}`."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def save_random_model(path: Path, config: PretrainedConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a random checkpoint of `config` (with tokenizer) to `path`; norms keep their ones."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:  # embeddings and linears
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    make_tokenizer(path, config.vocab_size)
    return path


def make_model(path: Path, shape: ModelShape, max_positions: int, seed: int = 0) -> Path:
    """Save a random float32 Llama checkpoint of `shape` (with tokenizer) to `path`."""
    return save_random_model(path, model_config(shape_config(shape), max_positions), seed=seed)


def make_random_adapters(
    config: PretrainedConfig,
    root: Path,
    count: int,
    rank: int,
    targets=ALL_TARGETS,
    prefix: str = "lora-",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Save `count` random PEFT LoRA adapters (A and B both non-zero) for a base of `config`.

    `dtype` is the saved tensors' (bfloat16 halves the disk that 512 adapters of a 1B base take).

    Returns:
        Each adapter's directory by name (`lora-0`, `lora-1`, ...).
    """
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    shapes = {key: tensor.shape for key, tensor in get_peft_model_state_dict(get_peft_model(base, lora_config)).items()}
    paths = {}
    for index in range(count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        tensors = {key: (torch.randn(shape, generator=generator) * INIT_STD).to(dtype) for key, shape in shapes.items()}
        path = root / f"{prefix}{index}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
        lora_config.save_pretrained(path)
        paths[path.name] = path
    return paths


def make_linked_adapters(
    config: PretrainedConfig,
    root: Path,
    count: int,
    rank: int,
    distinct: int = 4,
    prefix: str = "lora-",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """`count` adapter directories of which only the first `distinct` are written (`make_random_adapters`).

    Every other directory holds hard links (os.link) to the files of written adapter
    `index % distinct`: a real PEFT directory to any reader, so 10,000 take seconds and the disk
    of `distinct`. Adapters sharing files have equal weights, which no server can tell apart
    without comparing them.

    Returns:
        Each adapter's directory by name (`lora-0`, `lora-1`, ...).
    """
    paths = make_random_adapters(config, root, min(distinct, count), rank, prefix=prefix, seed=seed, dtype=dtype)
    written = list(paths.values())
    for index in range(len(written), count):
        path = root / f"{prefix}{index}"
        shutil.copytree(written[index % len(written)], path, copy_function=os.link)
        paths[path.name] = path
    return paths


def make_adapters(model_dir: Path, root: Path, count: int, rank: int, targets=ALL_TARGETS) -> dict[str, Path]:
    """Random adapters for the checkpoint saved in `model_dir` (see `make_random_adapters`)."""
    return make_random_adapters(AutoConfig.from_pretrained(model_dir), root, count, rank, targets)

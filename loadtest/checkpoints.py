"""Random benchmark checkpoints built on the fly: a Llama base, its tokenizer, PEFT LoRA adapters.

Owns: saving a random Llama model of a chosen shape (weights drawn from normal(0, 0.02)), a
word-level tokenizer covering the whole vocabulary (benchmark prompts are random token ids, so it
only has to load and decode), and random LoRA adapters saved by `peft` exactly as users' adapters
are. Nothing is downloaded; it must not time or run anything.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>")  # ids 0, 1, 2; prompts draw from the ids after them
INIT_STD = 0.02
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 32000


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


def make_model(path: Path, shape: ModelShape, max_positions: int, seed: int = 0) -> Path:
    """Save a random float32 Llama checkpoint (with tokenizer) to `path`.

    The model has no EOS token in its config, so Hugging Face `generate` neither stops early nor
    masks EOS, just as the engine with `ignore_eos` does.
    """
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:  # embeddings and linears; norms keep their ones
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    make_tokenizer(path, shape.vocab_size)
    return path


def make_adapters(model_dir: Path, root: Path, count: int, rank: int, targets=ALL_TARGETS) -> dict[str, Path]:
    """Save `count` random PEFT LoRA adapters (A and B both non-zero) under `root`.

    Returns:
        Each adapter's directory by name (`lora-0`, `lora-1`, ...).
    """
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(base, config)
    lora_params = [param for name, param in model.named_parameters() if "lora_" in name]
    paths = {}
    for index in range(count):
        generator = torch.Generator().manual_seed(1000 + index)
        with torch.no_grad():
            for param in lora_params:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        paths[f"lora-{index}"] = root / f"lora-{index}"
        model.save_pretrained(paths[f"lora-{index}"])
    return paths

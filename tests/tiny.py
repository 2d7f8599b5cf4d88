"""Tiny checkpoints and PEFT adapters built inside tests: nothing is downloaded.

Owns: small random models of each supported architecture (with a real tokenizer trained on the
fly), saved as Hugging Face checkpoint directories, and random LoRA adapters of chosen rank and
targets saved by `peft` exactly as users' adapters are.
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB_SIZE = 256
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "name: Ada, city: Paris, number: 42, date: 2024-01-01",
    "hello world, multi-LoRA serving on one base model",
    '{"json": true, "yaml": false} INSERT INTO t VALUES (1, 2);',
] * 20


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of VOCAB_SIZE tokens, with BOS/EOS and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    fast.save_pretrained(path)
    return fast


ARCHITECTURES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def make_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny checkpoint of `arch` (with tokenizer) to `path`."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        fields["head_dim"] = 16
    fields.update(overrides)
    config = ARCHITECTURES[arch](**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so logits are well separated
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def make_adapter(
    model_dir: Path,
    path: Path,
    rank: int = 8,
    targets: tuple[str, ...] | str = ("q_proj", "v_proj"),
    seed: int = 0,
    alpha: float | None = None,
    use_rslora: bool = False,
    **config_fields,
) -> Path:
    """Save a random PEFT LoRA adapter for the checkpoint at `model_dir` (B is non-zero)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=targets if isinstance(targets, str) else list(targets),  # a str is PEFT's regex or all-linear
        use_rslora=use_rslora,
        lora_dropout=0.0,
        **config_fields,
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())

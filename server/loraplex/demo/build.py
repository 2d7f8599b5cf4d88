"""Build the bundled demo from nothing: a tokenizer, a small base model, and one adapter per form.

Owns: the seeded, deterministic recipe (`DemoRecipe`) and the three stages run by
`python -m loraplex.demo.build`: train a byte-level BPE tokenizer with a chat template on the
synthetic corpus, train a small Llama from scratch to answer every record with a plain sentence,
then train a LoRA adapter per form (`json`, `yaml`, `sql`) with peft on that base. It ends by
checking each adapter's greedy answers on held-out records through the serving engine and writes
a manifest with the scores. The base is pre-trained to answer plain sentences, and to follow an
explicit `format=<form>` in a share of prompts, so every form's tokens are known to it; each
adapter then makes its form the answer to a plain prompt. The model goes to the package's `demo/model/` directory and the
adapters to `adapters/`, in PEFT's format.
"""

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraplex.demo import DEMO_MODEL_DIR
from loraplex.demo.records import ADAPTER_FORMS, FORMS, Record, answer, draw_records, prompt

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo's bytes; the same recipe on the same machine gives the same files."""

    seed: int = 1234
    held_out_seed: int = 98765
    train_records: int = 45000
    scrambled_fraction: float = 0.3
    asked_form_fraction: float = 0.15
    held_out_records: int = 200
    vocab_size: int = 320
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    batch_size: int = 32
    base_steps: int = 1500
    base_lr: float = 3e-3
    adapter_steps: int = 300
    adapter_lr: float = 1e-2
    lora_rank: int = 8
    lora_alpha: int = 16
    threads: int = 2


def train_tokenizer(records: list[Record], recipe: DemoRecipe) -> PreTrainedTokenizerFast:
    """A byte-level BPE over prompts and answers in every form, with the demo chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [prompt(r, form) + answer(r, form) for r in records[:5000] for form in FORMS]
    tokenizer.train_from_iterator(corpus, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _examples(
    tokenizer, records: list[Record], form: str, asked: list[str | None] | None = None
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per record: `<s>` + prompt + answer + `</s>`.

    `asked[i]`, when given and not None, is a form record i's prompt asks for explicitly, and
    its answer is in that form instead of `form`.
    """
    examples = []
    for index, record in enumerate(records):
        asked_form = asked[index] if asked is not None else None
        form_here = asked_form or form
        head = tokenizer(prompt(record, asked_form))["input_ids"]  # the tokenizer adds <s>, as the server's will
        tail = tokenizer(answer(record, form_here), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((head + tail, len(head)))
    return examples


def _batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)  # [B, T]
    labels = torch.full((len(examples), width), -100)  # [B, T]: only the answer is learned
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _train(model, examples, steps: int, lr: float, recipe: DemoRecipe, pad_id: int, label: str) -> float:
    """AdamW with warm-up and cosine decay over shuffled batches; returns the last loss."""
    rng = random.Random(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    order: list[int] = []
    model.train()
    loss_value, started = float("nan"), time.monotonic()
    for step in range(steps):
        if len(order) < recipe.batch_size:
            order = list(range(len(examples)))
            rng.shuffle(order)
        batch = _batch([examples[order.pop()] for _ in range(recipe.batch_size)], pad_id)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss_value = loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{label}] step {step + 1}/{steps} loss {loss_value:.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    model.eval()
    return loss_value


def build_base(tokenizer, records: list[Record], recipe: DemoRecipe) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    # Pre-training: plain sentences, plus a share of prompts that ask for a form by name, so the
    # base knows every form's tokens; asked nothing, it answers plain.
    rng = random.Random(recipe.seed)
    asked = [rng.choice(ADAPTER_FORMS) if rng.random() < recipe.asked_form_fraction else None for _ in records]
    examples = _examples(tokenizer, records, "plain", asked)
    _train(model, examples, recipe.base_steps, recipe.base_lr, recipe, tokenizer.pad_token_id, "base")
    return model


def build_adapter(base: LlamaForCausalLM, tokenizer, records: list[Record], form: str, recipe: DemoRecipe, out: Path):
    """Train one LoRA adapter that answers in `form` and save it where PEFT would."""
    torch.manual_seed(recipe.seed + FORMS.index(form))
    lora = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    _train(model, _examples(tokenizer, records, form), recipe.adapter_steps, recipe.adapter_lr, recipe, tokenizer.pad_token_id, form)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    return model.unload()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the bundled demo model and adapters (seeded, CPU, <= 20 min).")
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR, help="where the base model goes")
    parser.add_argument("--adapters-dir", type=Path, default=Path("adapters"), help="where the adapters go")
    parser.add_argument("--base-steps", type=int, help="override the recipe's base training steps")
    parser.add_argument("--adapter-steps", type=int, help="override the recipe's adapter training steps")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("base_steps", args.base_steps), ("adapter_steps", args.adapter_steps)) if v}
    recipe = DemoRecipe(**overrides)
    build(recipe, args.model_dir, args.adapters_dir)


def build(recipe: DemoRecipe, model_dir: Path, adapters_dir: Path) -> dict:
    """Run every stage and write the model, the adapters and `manifest.json`; returns the manifest.

    Torch's thread count and deterministic mode are set for the build and restored after it.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(recipe, model_dir, adapters_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(recipe: DemoRecipe, model_dir: Path, adapters_dir: Path) -> dict:
    from loraplex.demo.evaluate import evaluate

    started = time.monotonic()
    records = draw_records(recipe.seed, recipe.train_records, scrambled_fraction=recipe.scrambled_fraction)
    tokenizer = train_tokenizer(records, recipe)
    base = build_base(tokenizer, records, recipe)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    base.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    for form in ADAPTER_FORMS:
        out = adapters_dir / form
        if out.exists():
            shutil.rmtree(out)
        base = build_adapter(base, tokenizer, records, form, recipe, out)
    held_out = draw_records(recipe.held_out_seed, recipe.held_out_records, exclude=set(records))
    scores = evaluate(model_dir, {form: adapters_dir / form for form in ADAPTER_FORMS}, held_out)
    manifest = {"recipe": asdict(recipe), "held_out_scores": scores, "build_seconds": round(time.monotonic() - started)}
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["held_out_scores"], indent=2))
    print(f"built in {manifest['build_seconds']} s")
    return manifest


if __name__ == "__main__":
    main()

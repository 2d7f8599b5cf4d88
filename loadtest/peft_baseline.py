"""PEFT as users run it today: the throughput baseline the engine is measured against.

Owns: loading the base with several adapters through PEFT's documented API, and greedy generation
two ways: one left-padded static batch routed by `adapter_names` (PEFT's mixed-batch inference),
and one request at a time after `set_adapter`. Both generate exactly `max_tokens` tokens: the
benchmark checkpoints have no EOS token, like the engine's `ignore_eos`. It never times anything.
"""

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def load_peft(model_dir: Path, adapter_dirs: dict[str, Path]) -> PeftModel:
    """The float32 base with every adapter loaded under its name, in eval mode."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    (first, first_dir), *rest = adapter_dirs.items()
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both [N, longest], prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def peft_mixed_batch(
    model: PeftModel, prompts: list[list[int]], adapters: list[str], max_tokens: int
) -> list[list[int]]:
    """All requests in one `generate` call, each row routed to its adapter.

    Returns:
        The generated ids of each request.
    """
    input_ids, attention_mask = left_padded(prompts, model.config.pad_token_id)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        adapter_names=adapters,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
    )  # [N, longest + max_tokens]
    return output[:, input_ids.shape[1] :].tolist()


def peft_one_at_a_time(
    model: PeftModel, prompts: list[list[int]], adapters: list[str], max_tokens: int
) -> list[list[int]]:
    """Each request alone: activate its adapter, then `generate` without padding."""
    outputs = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        model.set_adapter(adapter)
        input_ids = torch.tensor([prompt])  # [1, n]
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
        )  # [1, n + max_tokens]
        outputs.append(output[0, input_ids.shape[1] :].tolist())
    return outputs

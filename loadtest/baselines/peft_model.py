"""PEFT as users run it today: the baseline that loraplex's engine and server are measured against.

Owns: loading a base with many adapters through PEFT's documented API, greedy generation the two
ways the engine benchmark times (one left-padded static batch routed by `adapter_names`, PEFT's
mixed-batch inference, and one request at a time after `set_adapter`), and what the baseline
servers add on top: a streamer that hands each decoding step's tokens to a callback, and the
cleanup after a failed mixed-batch call (peft#3475). It never times anything and knows no HTTP.
"""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora.model import _adapter_names_pre_forward_hook
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


def find_adapters(root: Path) -> dict[str, Path]:
    """Every adapter directory directly under `root` (one holding `adapter_config.json`), by directory name.

    Args:
        root: the folder whose subdirectories are PEFT adapters, as `save_pretrained` wrote them.

    Returns:
        Each adapter's directory by name, sorted by name.
    """
    return {path.name: path for path in sorted(root.iterdir()) if (path / "adapter_config.json").is_file()}


def load_peft(model_dir: Path, adapter_dirs: dict[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu") -> PeftModel:
    """The base with every adapter loaded under its name, on `device`, in eval mode.

    Args:
        model_dir: the base checkpoint.
        adapter_dirs: each adapter's directory by the name it is loaded under (at least one).
        dtype: the dtype of the base and the adapters.
        device: where the model runs once everything is loaded.
    """
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    (first, first_dir), *rest = adapter_dirs.items()
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.to(device).eval()


def take_over_eos(model: PeftModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The checkpoint's EOS ids (generation config's and tokenizer's, as vLLM stops on both), removed from
    the generation config so that `generate` leaves stopping to the caller's criteria.

    Args:
        model: the loaded model; its generation config loses its `eos_token_id`.
        tokenizer: the checkpoint's tokenizer.
    """
    named = model.generation_config.eos_token_id  # None, an id or a list of ids
    eos_ids = {named} if isinstance(named, int) else set(named or ())
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = None
    return frozenset(eos_ids)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both [N, longest], prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def peft_mixed_batch(model: PeftModel, prompts: list[list[int]], adapters: list[str], max_tokens: int) -> list[list[int]]:
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


def peft_one_at_a_time(model: PeftModel, prompts: list[list[int]], adapters: list[str], max_tokens: int) -> list[list[int]]:
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


class StepStreamer(BaseStreamer):
    """Hands the tokens of each decoding step to `on_step`, on `generate`'s thread.

    `generate` calls `put` first with the prompt ([B, W]), which is skipped, then once a step with
    that step's new tokens ([B]), then `end`.
    """

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step = on_step
        self.prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:  # value: [B, W], the prompt
            self.prompt_skipped = True
            return
        self.on_step(value.tolist())  # value: [B]

    def end(self) -> None:
        """Nothing is held back: every step was handed over when it came."""


def remove_stale_routing_hooks(model: PeftModel) -> int:
    """Remove the `adapter_names` hooks that a failed mixed-batch call left on the LoRA layers.

    PEFT removes them only when the call returns (peft#3475): after a `generate(adapter_names=...)`
    that raised, every later call, `set_adapter` ones included, would be routed by the failed call's
    adapter names.

    Returns:
        How many hooks were removed.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, partial) and hook.func is _adapter_names_pre_forward_hook:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                removed += 1
    return removed


def generate_streaming(
    model: PeftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    stopping: StoppingCriteria,
    max_new_tokens: int,
    on_step: Callable[[list[int]], None],
    adapter_names: list[str] | None = None,
) -> None:
    """Greedy `generate` that hands every step's new tokens to `on_step` as they come.

    Args:
        model: the PEFT model, its generation config without EOS (see `take_over_eos`).
        input_ids: [B, W] prompts, left-padded, on the model's device.
        attention_mask: [B, W], 0 on padding.
        stopping: which rows are done after each step; the call ends once all are.
        max_new_tokens: the most steps the call may take.
        on_step: called with the B new token ids of each step.
        adapter_names: each row's adapter (`"__base__"` for none) for a mixed batch; None runs the
            active adapter (or none, inside `disable_adapter()`).

    Raises:
        Whatever `generate` raised, once PEFT's stale routing hooks are removed.
    """
    routing = {} if adapter_names is None else {"adapter_names": adapter_names}
    try:
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([stopping]),
                streamer=StepStreamer(on_step),
                **routing,
            )
    except Exception:
        remove_stale_routing_hooks(model)
        raise

"""The mixed-batch PEFT server's worker: static batches routed by PEFT's `adapter_names`.

Owns: taking up to `max_batch` waiting requests once at least one waits, and one left-padded
greedy `generate(adapter_names=[...])` for them (`"__base__"` for base-model rows) that runs until
every row has reached its own end. Each request ends with its own row; requests arriving meanwhile
wait for the next batch. It must not admit requests into a running batch.
"""

from peft import PeftModel

from loadtest.baselines.peft_model import generate_streaming, left_padded
from loadtest.baselines.request import Request, RowLimits
from loadtest.baselines.worker import Worker

BASE_ROW = "__base__"  # PEFT's adapter name for a row without adapter


class MixedWorker(Worker):
    """A `Worker` that runs each batch as one PEFT mixed-batch `generate`.

    Args:
        model: the PEFT model with every adapter loaded.
        eos_ids: the checkpoint's EOS ids (see `take_over_eos`).
        pad_id: the token that left-pads shorter prompts (masked out, so any id works).
        max_batch: the most requests one batch takes.
    """

    def __init__(self, model: PeftModel, eos_ids: frozenset[int], pad_id: int, max_batch: int):
        super().__init__(model, eos_ids, max_batch)
        self.pad_id = pad_id

    def run(self, batch: list[Request]) -> None:
        input_ids, attention_mask = left_padded([r.prompt for r in batch], self.pad_id)  # [B, W] each
        limits = RowLimits(batch, input_ids.shape[1], self.device)

        def hand_out(tokens: list[int]) -> None:
            for request, token_id in zip(batch, tokens, strict=True):
                request.add_token(token_id)

        generate_streaming(
            self.model,
            input_ids.to(self.device),
            attention_mask.to(self.device),
            limits,
            limits.longest,
            on_step=hand_out,
            adapter_names=[r.adapter or BASE_ROW for r in batch],
        )

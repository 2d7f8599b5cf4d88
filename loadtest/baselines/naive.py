"""The naive PEFT server's worker: one request at a time, in arrival order.

Owns: activating the request's adapter (`set_adapter`, or `disable_adapter()` for the base model)
and one unpadded greedy `generate` for it, streamed token by token. It must not batch.
"""

import torch
from peft import PeftModel

from loadtest.baselines.peft_model import generate_streaming
from loadtest.baselines.request import Request, RowLimits
from loadtest.baselines.worker import Worker


class NaiveWorker(Worker):
    """A `Worker` that takes one request per run.

    Args:
        model: the PEFT model with every adapter loaded.
        eos_ids: the checkpoint's EOS ids (see `take_over_eos`).
    """

    def __init__(self, model: PeftModel, eos_ids: frozenset[int]):
        super().__init__(model, eos_ids, max_batch=1)

    def run(self, batch: list[Request]) -> None:
        (request,) = batch
        if request.adapter is None:
            with self.model.disable_adapter():
                self._generate(request)
        else:
            self.model.set_adapter(request.adapter)
            self._generate(request)

    def _generate(self, request: Request) -> None:
        input_ids = torch.tensor([request.prompt], device=self.device)  # [1, n]
        limits = RowLimits([request], input_ids.shape[1], self.device)
        generate_streaming(
            self.model,
            input_ids,
            torch.ones_like(input_ids),
            limits,
            request.max_tokens,
            on_step=lambda tokens: request.add_token(tokens[0]),
        )

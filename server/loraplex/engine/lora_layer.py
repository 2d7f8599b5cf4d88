"""The LoRA wrapper around each targetable linear of the base, and the slot stacks it owns.

Owns: wrapping q/k/v/o and gate/up/down projections once at start-up (quantized or not), the
pre-allocated stacks `lora_a: [max_loras + 1, max_rank, in]` and `lora_b: [max_loras + 1, max_rank,
out]` (B transposed, see ops/lora.py; the last slot is the all-zero null slot), and writing an
adapter into a slot. The base weights are never modified. Which tokens use which slot is read from the shared `LoraContext`.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.engine.ops.backend import ReferenceLora, TritonLora
from loraplex.lora.adapter import ModuleShape
from loraplex.lora.config import TARGET_NAMES


@dataclass
class LoraContext:
    """The current step's routing, set by the runner around each forward and read by every wrapper."""

    op: ReferenceLora | TritonLora = field(default_factory=ReferenceLora)  # the engine's LoRA backend
    batch: object | None = None  # what `op.prepare` built for this step; None: no adapter in the step


class LoraLinear(nn.Module):
    """`base(x)` plus the unmerged LoRA delta of each token's slot."""

    def __init__(self, base: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype, context: LoraContext):
        super().__init__()
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = next(base.parameters()).device
        self.register_buffer(
            "lora_a", torch.zeros(num_slots + 1, max_rank, self.in_features, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "lora_b", torch.zeros(num_slots + 1, max_rank, self.out_features, dtype=dtype, device=device), persistent=False
        )
        self.context = context
        self.slot_ranks = [0] * (num_slots + 1)  # rows of each slot that may be non-zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        y = self.base_layer(x)
        self.add_delta(y, x)
        return y

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """Add this step's LoRA delta of each token to `y` ([T, out], maybe a view), in place."""
        if self.context.batch is not None:
            self.context.op.add_delta(y, x, (self.lora_a,), (self.lora_b,), self.context.batch)

    def write_slot(self, slot: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float) -> None:
        """Copy one adapter's pair into `slot`, zero-padding the rank; None clears the slot.

        Only the rows the previous occupant used beyond the new rank are zeroed, so a slot switch
        between adapters of one rank is two copies per wrapper.
        """
        rank = self._set_rank(slot, 0 if lora_a is None else lora_a.shape[0])
        if lora_a is None:
            return
        self.lora_a[slot, :rank].copy_(lora_a)
        # B is scaled in float32, then stored in the stacks' dtype; PEFT's B is [out, r].
        if self.lora_b.dtype == torch.float32 and lora_b.dtype == torch.float32:
            torch.mul(lora_b.T, scaling, out=self.lora_b[slot, :rank])
        else:
            self.lora_b[slot, :rank].copy_(lora_b.to(torch.float32).mul(scaling).T)


    def copy_slot(self, slot: int, lora_a: torch.Tensor | None, lora_bt: torch.Tensor | None, non_blocking: bool) -> None:
        """Copy a pair already laid out as the stacks hold it (A [r, in], scaling * B.T [r, out]; slot_writer.py)."""
        rank = self._set_rank(slot, 0 if lora_a is None else lora_a.shape[0])
        if lora_a is not None:
            self.lora_a[slot, :rank].copy_(lora_a, non_blocking=non_blocking)
            self.lora_b[slot, :rank].copy_(lora_bt, non_blocking=non_blocking)

    def _set_rank(self, slot: int, rank: int) -> int:
        """Record `slot`'s new rank, zeroing the rows a previous, larger occupant used beyond it."""
        previous, self.slot_ranks[slot] = self.slot_ranks[slot], rank
        if previous > rank:
            self.lora_a[slot, rank:previous].zero_()
            self.lora_b[slot, rank:previous].zero_()
        return rank


def wrap_lora_targets(
    model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype, context: LoraContext
) -> dict[str, LoraLinear]:
    """Replace every targetable projection of `model` by a `LoraLinear`, once.

    Returns:
        The wrappers by qualified module name (as PEFT names them, e.g. `model.layers.0.self_attn.q_proj`).
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGET_NAMES and hasattr(module, "in_features")
    ]
    wrappers = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        wrapper = LoraLinear(module, num_slots, max_rank, dtype, context)
        setattr(model.get_submodule(parent_name), child, wrapper)
        wrappers[name] = wrapper
    return wrappers


def module_shapes(wrappers: dict[str, LoraLinear]) -> dict[str, ModuleShape]:
    """What adapters are validated against: each wrapped module's widths."""
    return {name: ModuleShape(w.in_features, w.out_features) for name, w in wrappers.items()}

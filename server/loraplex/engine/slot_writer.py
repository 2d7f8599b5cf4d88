"""Copying adapters into the device slot stacks, without stalling the step that follows.

Owns: `SlotImage`, an adapter as the stacks hold it (A, and B transposed with its scaling folded
in, in the stacks' dtype; on CUDA in pinned host memory), made once when the host tier reads the
adapter (host_tier.py keeps it), and `SlotWriter`, which copies images into slots. On CUDA the
copies are asynchronous, on a side stream, and the step waits for them on the device, not on the
host (`ready_for_step`). It decides nothing about which adapter goes where (slots.py does) and
never changes the base.
"""

from dataclasses import dataclass

import torch

from loraplex.engine.lora_layer import LoraLinear
from loraplex.lora.adapter import LoraAdapter


@dataclass
class SlotImage:
    """One adapter laid out as the slot stacks hold it, module by module."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], scaling * B.T [r, out])


def make_image(adapter: LoraAdapter, dtype: torch.dtype, pin: bool) -> SlotImage:
    """A [r, in] and B.T [r, out] of every module, scaled in float32 and cast once to `dtype`.

    The float32 product is the one the slots always held (PEFT scales B's output the same way).
    """
    pairs = {}
    for name, weights in adapter.modules.items():
        lora_a = weights.lora_a.to(dtype).contiguous()
        lora_bt = (weights.lora_b.to(torch.float32) * weights.scaling).T.to(dtype).contiguous()
        pairs[name] = (lora_a.pin_memory(), lora_bt.pin_memory()) if pin else (lora_a, lora_bt)
    return SlotImage(pairs)


class SlotWriter:
    """Writes slot images into every wrapper's slot stacks.

    Args:
        wrappers: the LoRA wrappers by module name.
        device: where the stacks live; CUDA gets a side stream for the copies.
    """

    def __init__(self, wrappers: dict[str, LoraLinear], device: torch.device):
        self.wrappers = wrappers
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending = False

    @property
    def pinned(self) -> bool:
        """Whether images should be made in pinned memory (the copies are asynchronous)."""
        return self._stream is not None

    def write(self, slot: int, image: SlotImage | None) -> None:
        """Copy `image` into `slot` of every wrapper (zeros where it has no module); None clears the slot."""
        pairs = image.pairs if image is not None else {}
        with torch.inference_mode():
            if self._stream is None:
                for name, wrapper in self.wrappers.items():
                    lora_a, lora_bt = pairs.get(name, (None, None))
                    wrapper.copy_slot(slot, lora_a, lora_bt, non_blocking=False)
                return
            # The side stream must not overwrite a slot that an earlier, still running step reads.
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            with torch.cuda.stream(self._stream):
                for name, wrapper in self.wrappers.items():
                    lora_a, lora_bt = pairs.get(name, (None, None))
                    wrapper.copy_slot(slot, lora_a, lora_bt, non_blocking=True)
            self._pending = True

    def ready_for_step(self) -> None:
        """Order the next step after every slot write so far, on the device (the host does not wait)."""
        if self._pending:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._pending = False

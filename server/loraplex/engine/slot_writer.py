"""Copying adapters into the device slot stacks, without stalling the step that follows.

Owns: `SlotImage`, an adapter as the stacks hold it (A, and B transposed with its scaling folded
in, in the stacks' dtype; on CUDA in pinned host memory, made once when the adapter is
registered), and `SlotWriter`, which copies images into slots. On CUDA the copies are
asynchronous, on a side stream, and the step waits for them on the device, not on the host
(`ready_for_step`); on CPU the scaling is applied straight into the stacks and no image is kept,
so host memory holds each adapter once. It decides nothing about which adapter goes where
(slots.py does) and never changes the base.
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
    """Writes adapters into every wrapper's slot stacks (the `SlotCache` callback).

    Args:
        wrappers: the LoRA wrappers by module name.
        dtype: the stacks' dtype.
        device: where the stacks live; CUDA gets pinned images and a side stream.
    """

    def __init__(self, wrappers: dict[str, LoraLinear], dtype: torch.dtype, device: torch.device):
        self.wrappers = wrappers
        self.dtype = dtype
        self.asynchronous = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.asynchronous else None
        self._images: dict[str, SlotImage] = {}  # adapter uid -> image, CUDA only
        self._pending = False

    def register(self, adapter: LoraAdapter) -> None:
        """Make `adapter`'s pinned image now (CUDA), so a slot write is one async copy per tensor."""
        if self.asynchronous and adapter.uid not in self._images:
            self._images[adapter.uid] = make_image(adapter, self.dtype, pin=True)

    def forget(self, adapter: LoraAdapter) -> None:
        """Drop `adapter`'s image (a retired version whose slot is free)."""
        self._images.pop(adapter.uid, None)

    def write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Copy `adapter` into `slot` of every wrapper (zeros where it has no module); None clears the slot."""
        with torch.inference_mode():
            if self._stream is None:
                self._write_in_place(slot, adapter)
                return
            if adapter is not None:
                self.register(adapter)
            image = self._images[adapter.uid] if adapter is not None else SlotImage({})
            # The side stream must not overwrite a slot that an earlier, still running step reads.
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            with torch.cuda.stream(self._stream):
                for name, wrapper in self.wrappers.items():
                    lora_a, lora_bt = image.pairs.get(name, (None, None))
                    wrapper.copy_slot(slot, lora_a, lora_bt, non_blocking=True)
            self._pending = True

    def _write_in_place(self, slot: int, adapter: LoraAdapter | None) -> None:
        """CPU: scale straight into the stacks (no image kept, no extra copy)."""
        for name, wrapper in self.wrappers.items():
            weights = adapter.modules.get(name) if adapter is not None else None
            if weights is None:
                wrapper.write_slot(slot, None, None, 0.0)
            else:
                wrapper.write_slot(slot, weights.lora_a, weights.lora_b, weights.scaling)

    def ready_for_step(self) -> None:
        """Order the next step after every slot write so far, on the device (the host does not wait)."""
        if self._pending:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._pending = False

"""The engine's adapters: which version each name serves, and the host and device tiers that hold them.

Owns: the name -> version table, the host tier (host_tier.py: versions in host memory, read from
disk on the loader pool) and the device slots (slots.py, copied into by slot_writer.py) wired
together: a slot write copies the version's host image, and a version in a slot is never evicted
from host memory; retired versions (replaced or removed) are freed once nothing uses them; and
where a version is now (`tier`). Every method runs on the engine's thread but `register`, which
only swaps the table's entry (the engine sends the rest through its inbox). Which request runs
when is the scheduler's; the step is the engine's.
"""

from collections.abc import Callable

import torch

from loraplex.config import EngineConfig
from loraplex.engine.host_tier import HostLimits, HostState, HostTier
from loraplex.engine.lora_layer import LoraLinear
from loraplex.engine.slot_writer import SlotImage, SlotWriter, make_image
from loraplex.engine.slots import SlotCache
from loraplex.engine.stats import EngineObserver
from loraplex.lora.adapter import LoraAdapter, ModuleShape
from loraplex.lora.index import read_source


class AdapterTiers:
    """Adapter versions by name, in host memory and device slots.

    Args:
        config: the engine's configuration (slots, rank, host-tier bounds, loader threads).
        wrappers: the LoRA wrappers whose slot stacks the slots are.
        module_shapes: what adapters are validated against (a read checks the weights again).
        dtype: the slot stacks' dtype.
        device: where the stacks live (CUDA: pinned images, asynchronous copies).
        wake: called from a loader thread when a read finishes.
    """

    def __init__(
        self,
        config: EngineConfig,
        wrappers: dict[str, LoraLinear],
        module_shapes: dict[str, ModuleShape],
        dtype: torch.dtype,
        device: torch.device,
        wake: Callable[[], None],
    ):
        self._config = config
        self._module_shapes = module_shapes
        self._dtype = dtype
        self.table: dict[str, LoraAdapter] = {}
        self.slot_writer = SlotWriter(wrappers, device)
        limits = HostLimits(config.max_cpu_lora_bytes, config.max_cpu_loras, config.lora_loader_threads)
        self.host = HostTier(limits, self._read_image, self._make_image, wake)
        self.slots = SlotCache(config.max_loras, self._write_slot)
        self._retired: list[LoraAdapter] = []

    def register(self, adapter: LoraAdapter) -> LoraAdapter | None:
        """Make `adapter` the version its name serves; returns the version it replaces, if any."""
        previous = self.table.get(adapter.name)
        self.table[adapter.name] = adapter
        return previous

    def retire(self, adapter: LoraAdapter) -> None:
        """`adapter` serves no new request: free its slot and host memory once nothing uses them."""
        self._retired.append(adapter)
        self.host.retire(adapter)
        self.free_retired()

    def free_retired(self) -> None:
        if self._retired:
            self._retired = [adapter for adapter in self._retired if not self.slots.discard(adapter)]

    def poll(self, observer: EngineObserver) -> list[LoraAdapter]:
        """Take up finished reads and evict past the host bounds; returns the versions whose read failed."""
        failed = self.host.poll(self.slots.is_resident)
        for seconds in self.host.stats.load_seconds:
            observer.host_loaded(seconds)
        self.host.stats.load_seconds.clear()
        for seconds in self.slots.stats.load_seconds:
            observer.adapter_loaded(seconds)
        self.slots.stats.load_seconds.clear()
        return failed

    def tier(self, adapter: LoraAdapter, slot_uids: tuple[str, ...]) -> str:
        """Where this version is now: device (in `slot_uids`, a snapshot's), host, loading, failed, or disk."""
        if adapter.uid in slot_uids:
            return "device"
        state = self.host.state(adapter)
        return "disk" if state is None else ("host" if state is HostState.READY else state.value)

    def _read_image(self, adapter: LoraAdapter) -> SlotImage:
        """On a loader thread: an indexed version's weights, read, validated and laid out for the slots."""
        loaded = read_source(adapter, self._module_shapes, self._config.max_lora_rank, self._dtype)
        return make_image(loaded, self._dtype, pin=self.slot_writer.pinned)

    def _make_image(self, adapter: LoraAdapter) -> SlotImage:
        return make_image(adapter, self._dtype, pin=self.slot_writer.pinned)

    def _write_slot(self, slot: int, adapter: LoraAdapter | None) -> None:
        """The slots' callback: copy the version's host image into `slot` (None clears it)."""
        self.slot_writer.write(slot, None if adapter is None else self.host.image(adapter))

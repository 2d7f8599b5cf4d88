"""Device slots for adapters: LRU replacement with reference counts.

Owns: which adapter version sits in which of the `max_loras` slots, how many running requests use
each, and the counters ops teams watch (loads, evictions, lookups, hits). An adapter in use is
never evicted; an idle one is replaced least-recently-used first. Copying weights into the slot
stacks is the `write_slot` callback's job, not this module's.
"""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.lora.adapter import LoraAdapter


@dataclass
class SlotStats:
    """Counters since start-up; `load_seconds` keeps each load's duration until drained."""

    loads: int = 0
    evictions: int = 0
    lookups: int = 0
    hits: int = 0
    load_seconds: list[float] = field(default_factory=list)


@dataclass
class _Resident:
    adapter: LoraAdapter
    slot: int
    refcount: int = 0


class SlotCache:
    """Maps adapter versions (by uid) to device slots.

    Args:
        num_slots: how many slots the device stacks have (`max_loras`).
        write_slot: copies an adapter into a slot (or clears it when given None).
    """

    def __init__(self, num_slots: int, write_slot: Callable[[int, LoraAdapter | None], None]):
        self.num_slots = num_slots
        self._write_slot = write_slot
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # uid -> entry, least recent first
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self.stats = SlotStats()

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """Pin `adapter` in a slot for one request, loading it if needed.

        Returns:
            The slot, or None when every slot is pinned by running requests.
        """
        self.stats.lookups += 1
        entry = self._resident.get(adapter.uid)
        if entry is not None:
            self.stats.hits += 1
            self._resident.move_to_end(adapter.uid)
            entry.refcount += 1
            return entry.slot
        slot = self._free.pop() if self._free else self._evict_idle()
        if slot is None:
            return None
        started = time.perf_counter()
        self._write_slot(slot, adapter)
        self.stats.load_seconds.append(time.perf_counter() - started)
        self.stats.loads += 1
        self._resident[adapter.uid] = _Resident(adapter, slot, refcount=1)
        return slot

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        """Whether `acquire` would succeed now, without changing anything."""
        if adapter.uid in self._resident or self._free:
            return True
        return any(entry.refcount == 0 for entry in self._resident.values())

    def is_resident(self, adapter: LoraAdapter) -> bool:
        return adapter.uid in self._resident

    def release(self, adapter: LoraAdapter) -> None:
        """Unpin one use of `adapter`; at zero uses it stays resident but becomes evictable."""
        entry = self._resident[adapter.uid]
        if entry.refcount <= 0:
            raise RuntimeError(f"adapter {adapter.name} released more often than acquired")
        entry.refcount -= 1

    def discard(self, adapter: LoraAdapter) -> bool:
        """Free `adapter`'s slot now if no request uses it (a deleted or replaced version).

        Returns:
            True when the slot was freed or the adapter was not resident.
        """
        entry = self._resident.get(adapter.uid)
        if entry is None:
            return True
        if entry.refcount > 0:
            return False
        del self._resident[adapter.uid]
        self._write_slot(entry.slot, None)
        self._free.append(entry.slot)
        return True

    def _evict_idle(self) -> int | None:
        for uid, entry in self._resident.items():
            if entry.refcount == 0:
                del self._resident[uid]
                self.stats.evictions += 1
                return entry.slot
        return None

    def slot_of(self, adapter: LoraAdapter) -> int:
        return self._resident[adapter.uid].slot

    def refcount(self, adapter: LoraAdapter) -> int:
        entry = self._resident.get(adapter.uid)
        return 0 if entry is None else entry.refcount

    def resident_uids(self) -> tuple[str, ...]:
        """The versions (uids) in slots now, sorted."""
        return tuple(sorted(self._resident))

    @property
    def bytes(self) -> int:
        """Bytes of the adapters in slots (as the host tier counts them)."""
        return sum(entry.adapter.nbytes for entry in self._resident.values())

    @property
    def used(self) -> int:
        return len(self._resident)

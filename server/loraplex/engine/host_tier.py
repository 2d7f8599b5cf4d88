"""The host tier: adapter versions in host memory, between the store on disk and the device slots.

Owns: which versions are in host memory (as `SlotImage`s: A, and B with its scaling folded in
once, pinned where a GPU is used), an LRU bounded by bytes and by count, reference counts (a
version a queued or running request needs is never evicted; neither is one in a device slot, nor
one pinned by configuration, nor one built in memory, which has no file to be read back from),
and the loader pool: reads from disk run on its threads, never on the engine thread, and a
finished read wakes the engine. Every method but the read itself runs on the engine thread.
Which version sits in which slot is slots.py's; what a read checks is lora/index.py's.
"""

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from loraplex.engine.slot_writer import SlotImage
from loraplex.errors import AdapterInvalid, LoraplexError
from loraplex.lora.adapter import LoraAdapter


class HostState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class HostStats:
    """Counters since start-up; `load_seconds` keeps each read's duration until drained."""

    loads: int = 0
    evictions: int = 0
    hits: int = 0
    misses: int = 0
    failures: int = 0
    load_seconds: list[float] = field(default_factory=list)


@dataclass
class _Entry:
    adapter: LoraAdapter
    state: HostState
    image: SlotImage | None = None
    future: Future | None = None
    error: LoraplexError | None = None
    refcount: int = 0
    permanent: bool = False  # pinned by configuration, or built in memory: never evicted
    retired: bool = False  # no longer registered: dropped once nothing uses it
    started: float = 0.0


@dataclass(frozen=True)
class HostLimits:
    """The host tier's bounds: bytes and, optionally, a count; 1 to 64 loader threads."""

    max_bytes: int
    max_count: int | None
    loader_threads: int


class HostTier:
    """Adapter versions (by uid) in host memory, read from disk on demand.

    Args:
        limits: the byte and count bounds, and the loader pool's size.
        read: reads an indexed version's weights and lays them out as the slots hold them
            (runs on a loader thread); raises a `LoraplexError` naming what is wrong.
        image: lays out an adapter built in memory (its `modules` set); runs on the engine thread.
        wake: called from a loader thread when a read finishes, so an idle engine steps again.
    """

    def __init__(
        self,
        limits: HostLimits,
        read: Callable[[LoraAdapter], SlotImage],
        image: Callable[[LoraAdapter], SlotImage],
        wake: Callable[[], None],
    ):
        self.limits = limits
        self._read = read
        self._image = image
        self._wake = wake
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # uid -> entry, least recently used first
        self._pool = ThreadPoolExecutor(max_workers=limits.loader_threads, thread_name_prefix="loraplex-loader")
        self._finished: list[_Entry] = []  # reads done, appended by loader threads (list.append is atomic)
        self.stats = HostStats()
        self.bytes = 0  # of READY images
        self.ready_count = 0
        self._loading = 0  # entries LOADING
        self.generation = 0  # bumped at every change of a version's state: what tells a snapshot is stale
        self.record_changes = False  # keep `changes` (an engine process reports them to the server)
        self.changes: dict[str, str | None] = {}  # uid -> its new state's value (None: gone), since taken

    # ----- requests' references -----------------------------------------------------------

    def acquire(self, adapter: LoraAdapter) -> HostState:
        """Take a reference to `adapter` for a queued request, starting its read if it is not here."""
        entry = self._entries.get(adapter.uid)
        if entry is not None and entry.state is HostState.READY:
            self.stats.hits += 1
            self._entries.move_to_end(adapter.uid)
        else:
            self.stats.misses += 1
            entry = entry or self._start(adapter)
        entry.refcount += 1
        return entry.state

    def release(self, adapter: LoraAdapter) -> None:
        """Give back one reference; at zero the version may be evicted (see `poll`)."""
        entry = self._entries.get(adapter.uid)
        if entry is None or entry.refcount <= 0:
            raise RuntimeError(f"adapter {adapter.name} released from the host tier more often than acquired")
        entry.refcount -= 1

    def pin(self, adapter: LoraAdapter) -> None:
        """Keep `adapter` in host memory for good (configuration), reading it now if needed."""
        entry = self._entries.get(adapter.uid) or self._start(adapter)
        entry.permanent = True

    def retire(self, adapter: LoraAdapter) -> None:
        """`adapter` is no longer registered: drop it once no request and no slot uses it."""
        entry = self._entries.get(adapter.uid)
        if entry is not None:
            entry.retired = True

    # ----- what the scheduler and the slots read ------------------------------------------

    def state(self, adapter: LoraAdapter) -> HostState | None:
        entry = self._entries.get(adapter.uid)
        return None if entry is None else entry.state

    def ready(self, adapter: LoraAdapter) -> bool:
        entry = self._entries.get(adapter.uid)
        return entry is not None and entry.state is HostState.READY

    def image(self, adapter: LoraAdapter) -> SlotImage:
        """The READY version's image (what a slot write copies)."""
        entry = self._entries[adapter.uid]
        if entry.image is None:
            raise RuntimeError(f"adapter {adapter.name} is not in host memory ({entry.state.value})")
        return entry.image

    def error(self, adapter: LoraAdapter) -> LoraplexError | None:
        entry = self._entries.get(adapter.uid)
        return None if entry is None else entry.error

    def loading(self) -> int:
        """Reads in flight (kept as a count: the snapshot reads it every step)."""
        return self._loading

    # ----- the engine's step boundary -----------------------------------------------------

    def poll(self, in_slot: Callable[[LoraAdapter], bool]) -> list[LoraAdapter]:
        """Take up finished reads, then evict down to the limits; returns the versions whose read failed.

        Args:
            in_slot: whether a version is in a device slot (those are never evicted here).
        """
        finished, self._finished = self._finished, []
        failed = []
        for entry in finished:
            if self._entries.get(entry.adapter.uid) is not entry:
                continue
            self._take_up(entry)
            if entry.state is HostState.FAILED:
                failed.append(entry.adapter)
        self._evict(in_slot)
        return failed

    def _take_up(self, entry: _Entry) -> None:
        future, entry.future = entry.future, None
        self._loading -= 1
        try:
            image = future.result()
        except LoraplexError as exc:
            entry.state, entry.error = HostState.FAILED, exc
        except Exception as exc:  # a read that broke in an unforeseen way still fails only its adapter
            entry.state = HostState.FAILED
            entry.error = AdapterInvalid(f"adapter {entry.adapter.name!r} could not be read: {type(exc).__name__}: {exc}")
        else:
            self._ready(entry, image)
            self.stats.loads += 1
            self.stats.load_seconds.append(time.perf_counter() - entry.started)
            return
        self.stats.failures += 1
        self._changed(entry.adapter.uid, HostState.FAILED.value)

    def _evict(self, in_slot: Callable[[LoraAdapter], bool]) -> None:
        limits = self.limits
        for uid, entry in list(self._entries.items()):
            over = self.bytes > limits.max_bytes or (limits.max_count is not None and self.ready_count > limits.max_count)
            idle = entry.refcount == 0 and entry.state is not HostState.LOADING and not in_slot(entry.adapter)
            if not idle or not (entry.retired or (over and not entry.permanent and entry.state is HostState.READY)):
                continue
            if not entry.retired:
                self.stats.evictions += 1
            self._drop(uid, entry)

    # ----- inside ---------------------------------------------------------------------------

    def _start(self, adapter: LoraAdapter) -> _Entry:
        entry = _Entry(adapter, HostState.LOADING, started=time.perf_counter())
        self._entries[adapter.uid] = entry
        if adapter.modules is not None:  # built in memory: no file to read, nothing to read it back from
            entry.permanent = True
            self._ready(entry, self._image(adapter))
            return entry
        self._loading += 1
        entry.future = self._pool.submit(self._read, adapter)
        entry.future.add_done_callback(lambda _, done=entry: self._done(done))
        self._changed(adapter.uid, HostState.LOADING.value)
        return entry

    def _done(self, entry: _Entry) -> None:
        """On the loader thread: hand the finished read to the engine thread, and wake it."""
        self._finished.append(entry)
        self._wake()

    def _ready(self, entry: _Entry, image: SlotImage) -> None:
        entry.state, entry.image = HostState.READY, image
        self.bytes += entry.adapter.nbytes
        self.ready_count += 1
        self._changed(entry.adapter.uid, HostState.READY.value)

    def take_changes(self) -> dict[str, str | None]:
        """The versions whose state changed since the last take (see `record_changes`)."""
        taken, self.changes = self.changes, {}
        return taken

    def _changed(self, uid: str, state: str | None) -> None:
        self.generation += 1
        if self.record_changes:
            self.changes[uid] = state

    def _drop(self, uid: str, entry: _Entry) -> None:
        del self._entries[uid]
        if entry.state is HostState.READY:
            self.bytes -= entry.adapter.nbytes
            self.ready_count -= 1
        entry.image = None
        self._changed(uid, None)

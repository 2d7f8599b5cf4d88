"""What the engine reports about itself, for metrics and health checks.

Owns: `EngineObserver`, the callbacks the engine makes from its own thread as requests progress
(the default does nothing), and `EngineSnapshot`, an immutable picture of the engine's queues,
KV cache and slots that the engine republishes after every step. Other threads read the snapshot
instead of the scheduler's live lists, which only the engine thread may touch. Nothing here
knows about Prometheus.
"""

from dataclasses import dataclass

from loraplex.engine.request import FinishReason, Request


class EngineObserver:
    """Hooks called on the engine thread; subclass and override what you need. Keep them cheap.

    `token` and `finished` see the request; by default they reduce it to the plain facts of
    `first_token`, `next_token` and `request_ended`, which is all the metrics need and all that
    crosses from an engine process to the server's (engine/core_process.py).
    """

    def step(self, num_seqs: int) -> None:
        """One forward pass ran over `num_seqs` sequences."""

    def token(self, request: Request, gap: float | None) -> None:
        """`request` got a token; `gap` is the seconds since its previous one (None for the first)."""
        if gap is None:
            self.first_token(len(request.prompt_ids), request.first_token_time - request.arrival_time)
        else:
            self.next_token(gap)

    def finished(self, request: Request, now: float) -> None:
        """`request` ended (any finish reason) at monotonic time `now`."""
        queued_until = request.first_scheduled_time if request.first_scheduled_time is not None else now
        self.request_ended(request.finish_reason, now - request.arrival_time, queued_until - request.arrival_time)

    def first_token(self, prompt_tokens: int, seconds: float) -> None:
        """A request of `prompt_tokens` got its first token `seconds` after it arrived."""

    def next_token(self, gap: float) -> None:
        """A request got a later token, `gap` seconds after its previous one."""

    def request_ended(self, reason: FinishReason, seconds: float, queued: float) -> None:
        """A request ended with `reason`, `seconds` after it arrived, having waited `queued` for admission."""

    def adapter_loaded(self, seconds: float) -> None:
        """An adapter was copied into a device slot in `seconds`."""

    def host_loaded(self, seconds: float) -> None:
        """An adapter was read from disk into host memory, `seconds` after its read was asked for."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its latest step.

    Args:
        time: wall-clock time (`time.time()`) of the latest step; 0 before the first.
        num_running: sequences holding KV blocks and (when they use an adapter) a slot.
        num_waiting: requests queued for admission, preempted ones and those whose grammar is being built included.
        running_adapters: names of the adapters the running sequences use, sorted, no repeats.
        waiting_adapters: the same for waiting requests.
        kv_cache_usage: fraction of KV blocks in use, in [0, 1].
        slots_used: device slots holding an adapter.
        slots_total: device slots (`max_loras`).
        adapter_loads / adapter_evictions / adapter_lookups / adapter_hits: slot counters since start.
        slot_uids: the adapter versions (`LoraAdapter.uid`) in device slots now, sorted.
        device_bytes: bytes of the adapters in device slots.
        host_adapters / host_bytes: versions in host memory, and their bytes.
        host_loading: versions being read from disk now.
        host_loads / host_evictions / host_hits / host_misses / host_failures: host-tier counters
            since start (a hit: a queued request found its version in host memory; a failure: a
            read refused, e.g. the version was replaced meanwhile).
        prefix_cache_queries / prefix_cache_hits: tokens of the requests admitted with a prefix-cache
            lookup, and of those the tokens found cached, since start (vLLM's hit rate: hits / queries).
    """

    time: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    kv_cache_usage: float = 0.0
    slots_used: int = 0
    slots_total: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    adapter_lookups: int = 0
    adapter_hits: int = 0
    slot_uids: tuple[str, ...] = ()
    device_bytes: int = 0
    host_adapters: int = 0
    host_bytes: int = 0
    host_loading: int = 0
    host_loads: int = 0
    host_evictions: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_failures: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

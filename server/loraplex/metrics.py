"""Every Prometheus metric the server exposes, in one place.

Owns: `Metrics`, an `EngineObserver` that turns the engine's callbacks into counters and
histograms, plus the counts only the HTTP layer sees (requests refused before the engine, tokens
per tenant); and `EngineSnapshotCollector`, which builds the gauges, the adapter slot counters and
`loraplex_lora_requests_info` at scrape time from one read of the engine's snapshot. Each `Metrics`
has its own `CollectorRegistry`: nothing is registered globally or at import, so several servers
can live in one process. Nothing here touches the engine's live state, only its snapshot, and the
callbacks run on the engine thread (or, with the engine in its own process, on the thread that
reads its reports), so they only update metrics.
"""

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from loraplex.engine.request import FinishReason
from loraplex.engine.stats import EngineObserver, EngineSnapshot
from loraplex.metrics_tiers import TIERS, TierCollector
from loraplex.metrics_vllm import VllmCompatCollector

# Statuses of requests the HTTP layer refuses before they reach the engine.
REJECTED = "rejected"  # the queue is full or the server is draining
INVALID = "invalid"  # the request failed validation
REFUSED_STATUSES = (REJECTED, INVALID)
REQUEST_STATUSES = tuple(reason.value for reason in FinishReason) + REFUSED_STATUSES

TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
INTER_TOKEN_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)
REQUEST_SECONDS_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    90.0, 120.0, 180.0, 240.0, 300.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
ADAPTER_SOURCES = ("store", "upload", "path")
ADAPTER_LOAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# (metric name, EngineSnapshot field, help) for what the engine counts itself, read at scrape time.
SNAPSHOT_GAUGES = (
    (
        "loraplex_num_requests_running",
        "num_running",
        "Requests running (holding KV blocks, and a slot if they use an adapter).",
    ),
    ("loraplex_num_requests_waiting", "num_waiting", "Requests queued for admission, preempted ones included."),
    ("loraplex_kv_cache_usage_ratio", "kv_cache_usage", "Fraction of KV cache blocks in use, from 0 to 1."),
    ("loraplex_adapter_slots_used", "slots_used", "Device LoRA slots holding an adapter."),
)
SNAPSHOT_COUNTERS = (  # CounterMetricFamily adds the _total suffix
    ("loraplex_adapter_loads", "adapter_loads", "Adapters copied into a device slot."),
    ("loraplex_adapter_evictions", "adapter_evictions", "Adapters evicted from a device slot to make room."),
    ("loraplex_adapter_cache_lookups", "adapter_lookups", "Requests for an adapter's device slot."),
    ("loraplex_adapter_cache_hits", "adapter_hits", "Slot requests served by an adapter already in a slot."),
    ("loraplex_prefix_cache_queries", "prefix_cache_queries", "Tokens of the requests looked up in the prefix cache."),
    ("loraplex_prefix_cache_hits", "prefix_cache_hits", "Of those tokens, the ones whose KV blocks were cached."),
)


class EngineSnapshotCollector(Collector):
    """The metrics that mirror the engine's own state, built from one snapshot per scrape.

    Args:
        snapshot: returns the engine's latest `EngineSnapshot`; called once per scrape.
    """

    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        for name, field, documentation in SNAPSHOT_GAUGES:
            yield GaugeMetricFamily(name, documentation, value=getattr(state, field))
        for name, field, documentation in SNAPSHOT_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=getattr(state, field))
        # The name ends in _total, which promtool accepts only on counters and untyped
        # metrics; untyped keeps the name and a clean `promtool check metrics`.
        slots_total = UnknownMetricFamily(
            "loraplex_adapter_slots_total", "Device LoRA slots (max_loras), used or not; constant."
        )
        slots_total.add_metric((), state.slots_total)
        yield slots_total
        lora_info = GaugeMetricFamily(
            "loraplex_lora_requests_info",
            "LoRA adapters in use; the value is the wall-clock time of the engine's latest step.",
            labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        )
        lora_info.add_metric(
            (str(state.slots_total), ",".join(state.running_adapters), ",".join(state.waiting_adapters)),
            state.time,
        )
        yield lora_info


class Metrics(EngineObserver):
    """The server's metrics, in a registry of their own.

    Args:
        snapshot: returns the engine's latest `EngineSnapshot`; read once per scrape.
        compat: `vllm` also exports vLLM's names for the engine's state (see metrics_vllm.py).
        model_name: the served base model's name, for vLLM's `model_name` label.
        registered: returns (adapters registered, their bytes), for the per-tier metrics
            (metrics_tiers.py); None leaves those out.
    """

    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot],
        compat: str = "none",
        model_name: str = "",
        registered: Callable[[], tuple[int, int]] | None = None,
    ):
        if compat not in ("none", "vllm"):
            raise ValueError(f"compat must be none or vllm, got {compat!r}")
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraplex_requests",
            "Requests ended, by status: a finish reason (stop, length, abort, error), or rejected or invalid "
            "for requests refused before reaching the engine.",
            ("status",),
            registry=self.registry,
        )
        for status in REQUEST_STATUSES:
            self.requests.labels(status=status)
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens of requests that produced a first token.", registry=self.registry
        )
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.", registry=self.registry)
        self.tenant_token_count = Counter(
            "loraplex_tenant_tokens",
            "Tokens of finished requests per tenant, by kind: prompt or generation.",
            ("tenant", "kind"),
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of a request.",
            buckets=INTER_TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "loraplex_e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end, whatever the finish reason.",
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.request_queue_time = Histogram(
            "loraplex_request_queue_time_seconds",
            "Seconds a request waited before it was first scheduled (or ended, if it never was).",
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "loraplex_batch_size",
            "Sequences in each forward pass.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Seconds to copy an adapter into a device slot.",
            buckets=ADAPTER_LOAD_BUCKETS,
            registry=self.registry,
        )
        self.adapter_register_seconds = Histogram(
            "loraplex_adapter_register_seconds",
            "Seconds to read, validate and register an adapter in host memory, by source: store (at start-up), "
            "upload, or path (/v1/load_lora_adapter). With one slot copy, this is an adapter's cold start.",
            ("source",),
            buckets=ADAPTER_LOAD_BUCKETS,
            registry=self.registry,
        )
        for source in ADAPTER_SOURCES:
            self.adapter_register_seconds.labels(source=source)
        self.tier_load_seconds = Histogram(
            "loraplex_adapter_tier_load_seconds",
            "Seconds to bring an adapter version into a tier: device, a copy into a slot; host, a read from disk "
            "(from the request that asked for it to its weights in host memory, validated).",
            ("tier",),
            buckets=ADAPTER_LOAD_BUCKETS,
            registry=self.registry,
        )
        for tier in TIERS[:2]:
            self.tier_load_seconds.labels(tier=tier)
        self.registry.register(EngineSnapshotCollector(snapshot))
        if registered is not None:
            self.registry.register(TierCollector(snapshot, registered))
        if compat == "vllm":
            self.registry.register(VllmCompatCollector(snapshot, model_name))

    # ----- engine callbacks (engine thread) -----------------------------------------------------

    def step(self, num_seqs: int) -> None:
        """Observe the size of one forward pass.

        Args:
            num_seqs: sequences in the batch.
        """
        self.batch_size.observe(num_seqs)

    def first_token(self, prompt_tokens: int, seconds: float) -> None:
        """Count a request's first token and its prompt; observe the time to it from arrival."""
        self.prompt_tokens.inc(prompt_tokens)
        self.time_to_first_token.observe(seconds)
        self.generation_tokens.inc()

    def next_token(self, gap: float) -> None:
        """Count a later token; observe the gap since the request's previous one."""
        self.inter_token_latency.observe(gap)
        self.generation_tokens.inc()

    def request_ended(self, reason: FinishReason, seconds: float, queued: float) -> None:
        """Count an ended request by finish reason; observe its latency and its time in the queue."""
        self.requests.labels(status=reason.value).inc()
        self.e2e_request_latency.observe(seconds)
        self.request_queue_time.observe(queued)

    def adapter_loaded(self, seconds: float) -> None:
        """Observe one adapter's copy into a device slot.

        Args:
            seconds: how long the copy took.
        """
        self.adapter_load_seconds.observe(seconds)
        self.tier_load_seconds.labels(tier="device").observe(seconds)

    def host_loaded(self, seconds: float) -> None:
        """Observe one adapter's read from disk into host memory.

        Args:
            seconds: from the request that asked for it to its weights in host memory.
        """
        self.tier_load_seconds.labels(tier="host").observe(seconds)

    # ----- adapter catalog ----------------------------------------------------------------------

    def adapter_registered(self, source: str, seconds: float) -> None:
        """Observe one adapter's read, validation and registration.

        Args:
            source: `store`, `upload` or `path`.
            seconds: how long it took.
        """
        self.adapter_register_seconds.labels(source=source).observe(seconds)

    # ----- HTTP layer ---------------------------------------------------------------------------

    def request_rejected(self, status: str) -> None:
        """Count a request refused before it reached the engine.

        Args:
            status: `REJECTED` (queue full or draining) or `INVALID` (bad input).
        """
        if status not in REFUSED_STATUSES:
            raise ValueError(f"status must be one of {REFUSED_STATUSES}, got {status!r}")
        self.requests.labels(status=status).inc()

    def tenant_tokens(self, tenant: str, prompt: int, generation: int) -> None:
        """Add a finished request's tokens to its tenant's totals.

        Args:
            tenant: the tenant the request was made for.
            prompt: prompt tokens.
            generation: generated tokens.
        """
        self.tenant_token_count.labels(tenant=tenant, kind="prompt").inc(prompt)
        self.tenant_token_count.labels(tenant=tenant, kind="generation").inc(generation)

    def render(self) -> tuple[bytes, str]:
        """The exposition of every metric, and its content type, for a `/metrics` response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

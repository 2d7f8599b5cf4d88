"""The adapter tiers' metrics: what is where (device slots, host memory, disk), and how it moves.

Owns: `TierCollector`, which builds, at scrape time from one read of the engine's snapshot and the
catalog's size, the `loraplex_adapter_tier_*` families, each labelled `tier`:

    adapters       gauge: versions in device slots; in host memory (which includes those in slots);
                   and on disk only (registered, in neither)
    bytes          gauge: their bytes in the serving dtype (disk: every registered adapter's)
    loads          counter: copies into a slot (device) and reads from disk (host)
    evictions      counter: versions pushed out to make room
    hits, misses   counter: a request found its version in the tier, or had to wait for it

The load-latency histogram per tier (`loraplex_adapter_tier_load_seconds`) is an observation,
not state: metrics.py keeps it. Nothing here touches the engine's live state.
"""

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.stats import EngineSnapshot

TIERS = ("device", "host", "disk")


class TierCollector(Collector):
    """Per-tier adapter metrics from one snapshot per scrape.

    Args:
        snapshot: returns the engine's latest `EngineSnapshot`.
        registered: returns (adapters registered, their bytes), every tier's superset.
    """

    def __init__(self, snapshot: Callable[[], EngineSnapshot], registered: Callable[[], tuple[int, int]]):
        self._snapshot = snapshot
        self._registered = registered

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        count, nbytes = self._registered()
        yield _family(
            GaugeMetricFamily, "adapters", "Adapter versions per tier: in device slots, in host memory, on disk only.",
            device=state.slots_used, host=state.host_adapters, disk=max(0, count - state.host_adapters),
        )  # fmt: skip
        yield _family(
            GaugeMetricFamily, "bytes", "Bytes of the adapter versions per tier (disk: every registered adapter).",
            device=state.device_bytes, host=state.host_bytes, disk=nbytes,
        )  # fmt: skip
        yield _family(
            CounterMetricFamily, "loads", "Adapter versions brought into a tier: copied into a slot, or read from disk.",
            device=state.adapter_loads, host=state.host_loads,
        )  # fmt: skip
        yield _family(
            CounterMetricFamily, "evictions", "Idle adapter versions pushed out of a tier to make room.",
            device=state.adapter_evictions, host=state.host_evictions,
        )  # fmt: skip
        yield _family(
            CounterMetricFamily, "hits", "Requests that found their adapter version in the tier.",
            device=state.adapter_hits, host=state.host_hits,
        )  # fmt: skip
        yield _family(
            CounterMetricFamily, "misses", "Requests that had to wait for their adapter version to reach the tier.",
            device=state.adapter_lookups - state.adapter_hits, host=state.host_misses,
        )  # fmt: skip
        failures = CounterMetricFamily(
            "loraplex_adapter_read_failures",
            "Adapter reads from disk refused (a version replaced meanwhile, or weights that fail validation).",
        )
        failures.add_metric((), state.host_failures)
        yield failures


def _family(kind, name: str, documentation: str, **values: int) -> Metric:
    family = kind(f"loraplex_adapter_tier_{name}", documentation, labels=("tier",))
    for tier, value in values.items():
        family.add_metric((tier,), value)
    return family

"""vLLM's metric names for the engine's state, so tools written for vLLM read loraplex as is.

Owns: `VllmCompatCollector`, which exports, from the same engine snapshot as loraplex's own
gauges, `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`
and the counters `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits` (tokens; `_total`
in the exposition) (labelled `model_name` and `engine`, as vLLM labels them) and
`vllm:lora_requests_info` (one
series per scrape: `max_lora`, and the comma-joined adapters with at least one running or
waiting request; the value is the time of the latest step). The Gateway API Inference
Extension's endpoint picker reads exactly these to route by queue depth, KV-cache use and
adapter affinity. Enabled with `--metrics-compat vllm`; it adds series and changes none.
"""

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.stats import EngineSnapshot

ENGINE_INDEX = "0"  # vLLM numbers its engine cores; loraplex runs one engine per server


class VllmCompatCollector(Collector):
    """vLLM-named gauges built from one engine snapshot per scrape.

    Args:
        snapshot: returns the engine's latest `EngineSnapshot`.
        model_name: the served base model's name (vLLM's `model_name` label).
    """

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str):
        self._snapshot = snapshot
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        labels = ("model_name", "engine")
        values = (self._model_name, ENGINE_INDEX)
        for name, value, documentation in (
            ("vllm:num_requests_running", state.num_running, "Number of requests in model execution batches."),
            ("vllm:num_requests_waiting", state.num_waiting, "Number of requests waiting to be processed."),
            ("vllm:kv_cache_usage_perc", state.kv_cache_usage, "KV-cache usage. 1 means 100 percent usage."),
        ):
            family = GaugeMetricFamily(name, documentation, labels=labels)
            family.add_metric(values, value)
            yield family
        for name, value, documentation in (
            ("vllm:prefix_cache_queries", state.prefix_cache_queries, "Prefix cache queries, in terms of number of queried tokens."),
            ("vllm:prefix_cache_hits", state.prefix_cache_hits, "Prefix cache hits, in terms of number of cached tokens."),
        ):
            counter = CounterMetricFamily(name, documentation, labels=labels)
            counter.add_metric(values, value)
            yield counter
        lora_info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
        )
        lora_info.add_metric(
            (str(state.slots_total), ",".join(state.waiting_adapters), ",".join(state.running_adapters)), state.time
        )
        yield lora_info

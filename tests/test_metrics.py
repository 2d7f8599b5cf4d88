"""The /metrics exposition: each callback moves its series, the snapshot is mirrored at scrape time,
every metric is there from the start, instances stay apart, and promtool accepts the result."""

import subprocess

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import METRIC_NAMES, require_promtool
from loraplex.engine.request import FinishReason, Request, SamplingParams
from loraplex.engine.stats import EngineSnapshot
from loraplex.metrics import INVALID, REJECTED, Metrics

STATUSES = ("stop", "length", "abort", "error", "rejected", "invalid")

BUSY = EngineSnapshot(
    time=1_700_000_000.5,
    num_running=3,
    num_waiting=7,
    running_adapters=("sql", "support"),
    waiting_adapters=("legal",),
    kv_cache_usage=0.625,
    slots_used=2,
    slots_total=4,
    adapter_loads=11,
    adapter_evictions=5,
    adapter_lookups=40,
    adapter_hits=29,
    prefix_cache_queries=512,
    prefix_cache_hits=384,
)


def make_request(
    arrival: float,
    prompt_len: int = 5,
    scheduled: float | None = None,
    first_token: float | None = None,
    finish: FinishReason | None = None,
) -> Request:
    request = Request("req-0", list(range(prompt_len)), adapter=None, params=SamplingParams())
    request.arrival_time = arrival
    request.first_scheduled_time = scheduled
    request.first_token_time = first_token
    request.finish_reason = finish
    return request


def families(metrics: Metrics) -> dict:
    """Scrape `metrics` and parse the exposition: family name -> family."""
    text = metrics.render()[0].decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(metrics: Metrics, sample_name: str, **labels: str) -> float:
    """The value of the one sample called `sample_name` with exactly `labels`."""
    for family in families(metrics).values():
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return sample.value
    raise KeyError(f"no sample {sample_name}{labels}")


def exercised_metrics() -> Metrics:
    """Metrics that have seen every callback, so every histogram and labelled series has data."""
    metrics = Metrics(lambda: BUSY)
    metrics.step(8)
    request = make_request(arrival=100.0, scheduled=100.5, first_token=100.75)
    metrics.token(request, None)
    metrics.token(request, 0.02)
    for reason in FinishReason:
        request.finish_reason = reason
        metrics.finished(request, 102.0)
    metrics.adapter_loaded(0.003)
    metrics.request_rejected(REJECTED)
    metrics.request_rejected(INVALID)
    metrics.tenant_tokens("acme", prompt=5, generation=2)
    metrics.tenant_tokens('team "quoted"\\', prompt=1, generation=1)
    return metrics


# ----- engine callbacks ---------------------------------------------------------------------------


def test_first_token_counts_the_prompt_and_observes_time_to_first_token():
    metrics = Metrics(EngineSnapshot)
    metrics.token(make_request(arrival=100.0, prompt_len=12, first_token=100.25), None)

    assert value(metrics, "loraplex_prompt_tokens_total") == 12
    assert value(metrics, "loraplex_generation_tokens_total") == 1
    assert value(metrics, "loraplex_time_to_first_token_seconds_count") == 1
    assert value(metrics, "loraplex_time_to_first_token_seconds_sum") == pytest.approx(0.25)
    assert value(metrics, "loraplex_time_to_first_token_seconds_bucket", le="0.1") == 0
    assert value(metrics, "loraplex_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(metrics, "loraplex_inter_token_latency_seconds_count") == 0


def test_later_tokens_observe_inter_token_latency_and_not_the_prompt():
    metrics = Metrics(EngineSnapshot)
    request = make_request(arrival=100.0, prompt_len=12, first_token=100.25)
    metrics.token(request, 0.03)
    metrics.token(request, 0.05)

    assert value(metrics, "loraplex_generation_tokens_total") == 2
    assert value(metrics, "loraplex_prompt_tokens_total") == 0
    assert value(metrics, "loraplex_time_to_first_token_seconds_count") == 0
    assert value(metrics, "loraplex_inter_token_latency_seconds_count") == 2
    assert value(metrics, "loraplex_inter_token_latency_seconds_sum") == pytest.approx(0.08)


@pytest.mark.parametrize("reason", list(FinishReason))
def test_finished_counts_its_reason_and_observes_latency_and_queue_time(reason):
    metrics = Metrics(EngineSnapshot)
    metrics.finished(make_request(arrival=100.0, scheduled=100.5, first_token=101.0, finish=reason), 104.0)

    for status in STATUSES:
        assert value(metrics, "loraplex_requests_total", status=status) == (1 if status == reason.value else 0)
    assert value(metrics, "loraplex_e2e_request_latency_seconds_count") == 1
    assert value(metrics, "loraplex_e2e_request_latency_seconds_sum") == pytest.approx(4.0)
    assert value(metrics, "loraplex_request_queue_time_seconds_count") == 1
    assert value(metrics, "loraplex_request_queue_time_seconds_sum") == pytest.approx(0.5)


def test_queue_time_of_a_request_never_scheduled_runs_until_it_ended():
    metrics = Metrics(EngineSnapshot)
    metrics.finished(make_request(arrival=100.0, finish=FinishReason.ABORT), 103.0)

    assert value(metrics, "loraplex_request_queue_time_seconds_sum") == pytest.approx(3.0)
    assert value(metrics, "loraplex_e2e_request_latency_seconds_sum") == pytest.approx(3.0)


def test_step_observes_batch_size():
    metrics = Metrics(EngineSnapshot)
    metrics.step(1)
    metrics.step(48)

    assert value(metrics, "loraplex_batch_size_count") == 2
    assert value(metrics, "loraplex_batch_size_sum") == 49
    assert value(metrics, "loraplex_batch_size_bucket", le="1.0") == 1
    assert value(metrics, "loraplex_batch_size_bucket", le="32.0") == 1
    assert value(metrics, "loraplex_batch_size_bucket", le="48.0") == 2


def test_adapter_loaded_observes_load_seconds():
    metrics = Metrics(EngineSnapshot)
    metrics.adapter_loaded(0.0004)

    assert value(metrics, "loraplex_adapter_load_seconds_count") == 1
    assert value(metrics, "loraplex_adapter_load_seconds_sum") == pytest.approx(0.0004)
    assert value(metrics, "loraplex_adapter_load_seconds_bucket", le="0.00025") == 0
    assert value(metrics, "loraplex_adapter_load_seconds_bucket", le="0.0005") == 1


@pytest.mark.parametrize("source", ["store", "upload", "path"])
def test_adapter_registered_observes_register_seconds_by_source(source):
    metrics = Metrics(EngineSnapshot)
    metrics.adapter_registered(source, 0.003)

    assert value(metrics, "loraplex_adapter_register_seconds_count", source=source) == 1
    assert value(metrics, "loraplex_adapter_register_seconds_bucket", source=source, le="0.0025") == 0
    assert value(metrics, "loraplex_adapter_register_seconds_bucket", source=source, le="0.005") == 1
    others = [other for other in ("store", "upload", "path") if other != source]
    assert [value(metrics, "loraplex_adapter_register_seconds_count", source=other) for other in others] == [0, 0]


# ----- HTTP layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [REJECTED, INVALID])
def test_refused_requests_count_under_their_status(status):
    metrics = Metrics(EngineSnapshot)
    metrics.request_rejected(status)

    assert value(metrics, "loraplex_requests_total", status=status) == 1
    assert sum(value(metrics, "loraplex_requests_total", status=s) for s in STATUSES) == 1


def test_unknown_refusal_status_is_an_error():
    with pytest.raises(ValueError, match="status must be one of"):
        Metrics(EngineSnapshot).request_rejected("teapot")


def test_tenant_tokens_add_up_per_tenant_and_kind():
    metrics = Metrics(EngineSnapshot)
    metrics.tenant_tokens("acme", prompt=10, generation=4)
    metrics.tenant_tokens("acme", prompt=6, generation=1)
    metrics.tenant_tokens("globex", prompt=3, generation=2)

    assert value(metrics, "loraplex_tenant_tokens_total", tenant="acme", kind="prompt") == 16
    assert value(metrics, "loraplex_tenant_tokens_total", tenant="acme", kind="generation") == 5
    assert value(metrics, "loraplex_tenant_tokens_total", tenant="globex", kind="prompt") == 3
    assert value(metrics, "loraplex_tenant_tokens_total", tenant="globex", kind="generation") == 2


# ----- the exposition -----------------------------------------------------------------------------


def test_render_returns_the_exposition_and_its_content_type():
    body, content_type = Metrics(EngineSnapshot).render()

    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    assert b"# HELP loraplex_requests_total" in body


def declared_names(metrics: Metrics) -> set[str]:
    """Every metric name the exposition declares, counters with their `_total`, whether or not it has samples."""
    return {family.name + ("_total" if family.type == "counter" else "") for family in families(metrics).values()}


def test_every_metric_is_declared_before_anything_happens():
    declared = declared_names(Metrics(EngineSnapshot))

    assert [name for name in METRIC_NAMES if name not in declared] == []


def test_every_metric_has_samples_once_exercised():
    found = families(exercised_metrics())
    sampled = {sample.name for family in found.values() for sample in family.samples}

    assert [name for name in METRIC_NAMES if not {name, name + "_count"} & sampled] == []


def test_every_metric_has_help_text():
    found = families(exercised_metrics())

    assert [name for name, family in found.items() if not family.documentation] == []


def test_request_statuses_start_at_zero():
    metrics = Metrics(EngineSnapshot)

    assert [value(metrics, "loraplex_requests_total", status=status) for status in STATUSES] == [0] * len(STATUSES)


def test_gauges_and_slot_counters_mirror_the_snapshot():
    metrics = Metrics(lambda: BUSY)

    assert value(metrics, "loraplex_num_requests_running") == 3
    assert value(metrics, "loraplex_num_requests_waiting") == 7
    assert value(metrics, "loraplex_kv_cache_usage_ratio") == 0.625
    assert value(metrics, "loraplex_adapter_slots_used") == 2
    assert value(metrics, "loraplex_adapter_slots_total") == 4
    assert value(metrics, "loraplex_adapter_loads_total") == 11
    assert value(metrics, "loraplex_adapter_evictions_total") == 5
    assert value(metrics, "loraplex_adapter_cache_lookups_total") == 40
    assert value(metrics, "loraplex_adapter_cache_hits_total") == 29
    assert value(metrics, "loraplex_prefix_cache_queries_total") == 512
    assert value(metrics, "loraplex_prefix_cache_hits_total") == 384


def test_a_scrape_reads_the_snapshot_once():
    reads = []
    metrics = Metrics(lambda: reads.append(1) or BUSY)
    metrics.render()

    assert len(reads) == 1


def test_lora_requests_info_is_one_series_labelled_from_the_snapshot():
    samples = families(Metrics(lambda: BUSY))["loraplex_lora_requests_info"].samples

    assert len(samples) == 1
    assert samples[0].labels == {
        "max_lora": "4",
        "running_lora_adapters": "sql,support",
        "waiting_lora_adapters": "legal",
    }
    assert samples[0].value == BUSY.time


def test_lora_requests_info_follows_the_snapshot_between_scrapes():
    current = [EngineSnapshot(slots_total=2)]
    metrics = Metrics(lambda: current[0])

    before = families(metrics)["loraplex_lora_requests_info"].samples
    current[0] = BUSY
    after = families(metrics)["loraplex_lora_requests_info"].samples

    assert [(s.labels, s.value) for s in before] == [
        ({"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}, 0.0)
    ]
    assert len(after) == 1
    assert after[0].labels["running_lora_adapters"] == "sql,support"
    assert after[0].value == BUSY.time


def test_two_instances_keep_their_series_apart():
    first, second = Metrics(lambda: BUSY), Metrics(EngineSnapshot)
    first.step(4)
    first.request_rejected(REJECTED)

    assert value(first, "loraplex_batch_size_count") == 1
    assert value(second, "loraplex_batch_size_count") == 0
    assert value(second, "loraplex_requests_total", status=REJECTED) == 0
    assert value(first, "loraplex_num_requests_running") == 3
    assert value(second, "loraplex_num_requests_running") == 0


def test_nothing_is_registered_in_the_global_registry():
    Metrics(lambda: BUSY).step(1)
    global_names = {family.name for family in prometheus_client.REGISTRY.collect()}

    assert [name for name in global_names if name.startswith("loraplex_")] == []


def test_exposition_passes_promtool():
    promtool = require_promtool()

    body, _ = exercised_metrics().render()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )

    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and problems == "", problems

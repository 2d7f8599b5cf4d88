"""`--metrics-compat vllm`: vLLM's names for queue depth, KV-cache use and adapters in use.

The Inference Gateway's endpoint picker (and anything else written for vLLM) reads these; they
must carry vLLM's semantics and agree with loraplex's own gauges at every scrape.
"""

import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_promtool
from live_server import LiveServer, server_config
from loraplex.metrics import Metrics
from test_metrics import BUSY, families, value

LABELS = {"model_name": "demo", "engine": "0"}


@pytest.mark.parametrize(
    "name, expected",
    [("vllm:num_requests_running", 3), ("vllm:num_requests_waiting", 7), ("vllm:kv_cache_usage_perc", 0.625)],
)
def test_vllm_gauges_carry_the_engines_state_with_vllms_labels(name, expected):
    assert value(Metrics(lambda: BUSY, "vllm", "demo"), name, **LABELS) == expected


@pytest.mark.parametrize("name, expected", [("vllm:prefix_cache_queries_total", 512), ("vllm:prefix_cache_hits_total", 384)])
def test_vllm_prefix_cache_counters_count_tokens_with_vllms_labels(name, expected):
    metrics = Metrics(lambda: BUSY, "vllm", "demo")
    assert families(metrics)[name.removesuffix("_total")].type == "counter"
    assert value(metrics, name, **LABELS) == expected


def test_vllm_lora_requests_info_is_one_series_naming_adapters_with_running_or_waiting_requests():
    series = families(Metrics(lambda: BUSY, "vllm", "demo"))["vllm:lora_requests_info"].samples
    assert [(sample.labels, sample.value) for sample in series] == [
        ({"max_lora": "4", "running_lora_adapters": "sql,support", "waiting_lora_adapters": "legal"}, BUSY.time)
    ]


def test_without_compat_no_vllm_name_is_exported():
    assert not [name for name in families(Metrics(lambda: BUSY)) if name.startswith("vllm:")]


def test_an_unknown_compat_mode_is_refused():
    with pytest.raises(ValueError, match="none or vllm"):
        Metrics(lambda: BUSY, "sglang")


def test_the_compat_exposition_only_lints_for_vllms_colons():
    """promtool's linter dislikes ':' in names, which are vLLM's; nothing else may be flagged."""
    promtool = require_promtool()
    text = Metrics(lambda: BUSY, "vllm", "demo").render()[0]
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines() if line.strip()]
    assert len(problems) == 6
    assert all(line.startswith("vllm:") and line.endswith("metric names should not contain ':'") for line in problems)


def test_a_live_server_with_compat_agrees_with_its_own_gauges(llama, tmp_path):
    config = server_config(llama.model_dir, tmp_path).model_copy(update={"metrics_compat": "vllm"})
    with LiveServer(config) as server:
        body = {"model": "tiny-base", "prompt": [5, 6, 7], "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(server.url + "/metrics", timeout=60).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    labels = (("engine", "0"), ("model_name", "tiny-base"))
    for ours, theirs in (
        ("loraplex_num_requests_running", "vllm:num_requests_running"),
        ("loraplex_num_requests_waiting", "vllm:num_requests_waiting"),
        ("loraplex_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"),
    ):
        assert samples[(theirs, labels)] == samples[(ours, ())]
    (ours,) = [dict(labels) for name, labels in samples if name == "loraplex_lora_requests_info"]
    (theirs,) = [dict(labels) for name, labels in samples if name == "vllm:lora_requests_info"]
    assert theirs == ours

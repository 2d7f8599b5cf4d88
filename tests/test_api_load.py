"""The server under load, over HTTP: a full queue answers 429, a client that goes away cancels its
request and frees what it held, /health and /metrics stay prompt while the engine is busy, and
/metrics tells the truth about the traffic it saw.

On these CPUs the tiny model makes about a token a millisecond, so "long" requests ask for 2,000
tokens (max_model_len 2048): seconds of work, long enough that a cancelled request is told apart
from a finished one and that a running request is still running when the next call lands. Every
wait is bounded by a deadline.
"""

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import METRIC_NAMES, require_promtool
from live_server import LiveServer, server_config, upload

BASE = "tiny-base"
ADAPTER = "r4-qv"
MAX_LORAS = 4
MAX_MODEL_LEN = 2048
LONG = 2000  # tokens of a request that keeps the engine busy for seconds
TIMEOUT = httpx.Timeout(30)
DEADLINE = 10.0  # seconds any awaited state change may take



# ----- helpers ------------------------------------------------------------------------------------


def long_body(model: str = BASE, **fields) -> dict:
    return {"model": model, "prompt": "hello", "max_tokens": LONG, "ignore_eos": True, **fields}


class Stream:
    """A streaming completion, read chunk by chunk; `close()` hangs up on it.

    The line iterator lives as long as the stream: dropping a half-read iterator would close the
    connection, and so cancel the request, behind the test's back.
    """

    def __init__(self, client: httpx.Client, body: dict):
        request = client.build_request("POST", "/v1/completions", json={**body, "stream": True})
        self.response = client.send(request, stream=True)  # returns once the server queued the request
        assert self.response.status_code == 200, self.response.read()
        self._lines = self.response.iter_lines()

    def chunks(self, count: int) -> list[dict]:
        """The next `count` SSE chunks (each carries a token)."""
        chunks, deadline = [], time.monotonic() + DEADLINE
        for line in self._lines:
            assert time.monotonic() < deadline, f"only {len(chunks)} of {count} chunks within {DEADLINE}s"
            if line.startswith("data: "):
                chunks.append(json.loads(line.removeprefix("data: ")))
                if len(chunks) == count:
                    return chunks
        raise AssertionError(f"the stream ended after {len(chunks)} of {count} chunks")

    def rest(self) -> list[dict]:
        """Every remaining SSE payload up to the end of the body (the server's handler is done then)."""
        return [json.loads(line.removeprefix("data: ")) for line in self._lines if line.startswith("data: {")]

    def close(self) -> None:
        self._lines.close()
        self.response.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(0.01)


def engine_idle(engine) -> bool:
    state = engine.snapshot
    return state.num_running == 0 and state.num_waiting == 0 and state.kv_cache_usage == 0


@contextmanager
def long_streams(client: httpx.Client, count: int, model: str = BASE) -> Iterator[list[Stream]]:
    """`count` long streaming requests, each past its first token; closed (cancelled) on exit."""
    streams = []
    try:
        for _ in range(count):
            streams.append(Stream(client, long_body(model)))
            streams[-1].chunks(1)
        yield streams
    finally:
        for stream in reversed(streams):
            stream.close()


Samples = dict[tuple[str, frozenset], float]


def scrape(client: httpx.Client) -> Samples:
    """Every sample of /metrics: (name, labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# ----- servers ------------------------------------------------------------------------------------


ENGINE_MODES, ENGINE_IDS = [False, True], ["engine-thread", "engine-process"]  # engine_process off, on


@pytest.fixture(scope="module", params=ENGINE_MODES, ids=ENGINE_IDS)
def server(llama, tmp_path_factory, request):
    """The shared server: room for several long requests at once, and one uploaded adapter.

    Once with the engine on a server thread, once in a process of its own (`loraplex serve`'s way).
    """
    config = server_config(
        llama.model_dir,
        tmp_path_factory.mktemp("adapters"),
        engine_process=request.param,
        max_loras=MAX_LORAS,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
    )
    with LiveServer(config) as live:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
            assert upload(http, ADAPTER, llama.adapter_dirs[ADAPTER]).status_code == 201
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http
    wait_until(lambda: engine_idle(server.engine), "idle after the test")


@pytest.fixture(scope="module", params=ENGINE_MODES, ids=ENGINE_IDS)
def queue_server(llama, tmp_path_factory, request):
    """One request may run and one may wait; a third is refused."""
    config = server_config(
        llama.model_dir, tmp_path_factory.mktemp("adapters"), engine_process=request.param,
        max_model_len=MAX_MODEL_LEN, max_num_seqs=1, max_queue=1,
    )  # fmt: skip
    with LiveServer(config) as live:
        yield live


@pytest.fixture
def queue_client(queue_server):
    with httpx.Client(base_url=queue_server.url, timeout=TIMEOUT) as http:
        yield http
    wait_until(lambda: engine_idle(queue_server.engine), "idle after the test")


@contextmanager
def full_queue(server: LiveServer, client: httpx.Client) -> Iterator[None]:
    """One long request running and one waiting behind it; both cancelled on exit."""
    with long_streams(client, 1):
        waiting = Stream(client, long_body())
        try:
            wait_until(
                lambda: server.engine.snapshot.num_running == 1 and server.engine.snapshot.num_waiting == 1,
                "one running and one waiting",
            )
            yield
        finally:
            waiting.close()


# ----- 429 ----------------------------------------------------------------------------------------


def test_request_past_a_full_queue_gets_429_with_retry_after(queue_server, queue_client):
    with full_queue(queue_server, queue_client):
        response = queue_client.post("/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 4})

    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == str(queue_server.config.retry_after)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "queue_full"
    assert "queue" in error["message"]


def test_openai_sdk_sees_a_full_queue_as_rate_limit_error(queue_server, queue_client):
    with openai.OpenAI(base_url=f"{queue_server.url}/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        with full_queue(queue_server, queue_client), pytest.raises(openai.RateLimitError) as caught:
            sdk.completions.create(model=BASE, prompt="hello", max_tokens=4)

    assert caught.value.code == "queue_full"


def test_a_refused_request_counts_as_rejected_and_never_reaches_the_engine(queue_server, queue_client):
    with full_queue(queue_server, queue_client):
        before = scrape(queue_client)
        assert queue_client.post("/v1/completions", json={"model": BASE, "prompt": "hi"}).status_code == 429
        after = scrape(queue_client)

    assert grew(before, after, "loraplex_requests_total", status="rejected") == 1
    assert grew(before, after, "loraplex_prompt_tokens_total") == 0
    assert value(after, "loraplex_num_requests_waiting") == 1


def test_server_serves_again_once_the_full_queue_is_cancelled(queue_server, queue_client):
    with full_queue(queue_server, queue_client):
        assert queue_client.post("/v1/completions", json={"model": BASE, "prompt": "hi"}).status_code == 429

    wait_until(lambda: engine_idle(queue_server.engine), "idle once both requests are cancelled")
    response = queue_client.post("/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


# ----- cancellation on disconnect -----------------------------------------------------------------


def close_after_two_chunks(client: httpx.Client, server: LiveServer) -> None:
    with closing(Stream(client, long_body(ADAPTER))) as stream:
        stream.chunks(2)
        assert server.engine.snapshot.running_adapters == (ADAPTER,)


def time_out_without_a_response(client: httpx.Client, server: LiveServer) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json=long_body(ADAPTER), timeout=httpx.Timeout(30, read=0.25))


@pytest.mark.parametrize("leave", [close_after_two_chunks, time_out_without_a_response], ids=["stream", "non-stream"])
def test_client_that_goes_away_cancels_its_request_and_frees_kv_and_slot(server, client, leave):
    before = scrape(client)

    leave(client, server)

    wait_until(
        lambda: engine_idle(server.engine) and server.engine.snapshot.running_adapters == (),
        "idle with KV and the adapter slot released",
    )
    after = scrape(client)
    assert value(after, "loraplex_num_requests_running") == 0
    assert value(after, "loraplex_num_requests_waiting") == 0
    assert value(after, "loraplex_kv_cache_usage_ratio") == 0
    assert grew(before, after, "loraplex_requests_total", status="abort") == 1
    assert grew(before, after, "loraplex_requests_total", status="length") == 0
    assert 1 <= grew(before, after, "loraplex_generation_tokens_total") < LONG // 2


# ----- cheap endpoints under load -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_endpoint_answers_promptly_while_the_engine_is_busy(server, client, path):
    # Promptly means within the engine's work, not within a wall-clock budget: all ten calls
    # answer while the four 2,000-token requests, each past its first token, are still running.
    with long_streams(client, 4):
        for _ in range(10):
            started = time.monotonic()
            response = client.get(path)
            assert response.status_code == 200
            assert time.monotonic() - started < DEADLINE
        assert server.engine.snapshot.num_running == 4  # the load lasted through every call


@pytest.mark.parametrize("engine_process", ENGINE_MODES, ids=ENGINE_IDS)
def test_health_is_503_when_the_engine_loop_is_not_running(llama, tmp_path, engine_process):
    with LiveServer(server_config(llama.model_dir, tmp_path / "adapters", engine_process=engine_process)) as live:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
            assert http.get("/health").status_code == 200
            live.engine.stop()

            response = http.get("/health")

    assert response.status_code == 503
    assert "engine" in response.json()["status"]


# ----- /metrics after traffic ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def traffic(server):
    """Scrapes around known traffic: two adapter completions, a streamed one, a 404.

    Returns (before, after, usages, exposition text).
    """
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        wait_until(lambda: engine_idle(server.engine), "idle before the traffic")
        before = scrape(http)
        usages = []
        for prompt in ("hello world", "the quick brown fox"):
            response = http.post("/v1/completions", json={"model": ADAPTER, "prompt": prompt, "max_tokens": 6, "ignore_eos": True})
            assert response.status_code == 200, response.text
            usages.append(response.json()["usage"])
        streamed = {"model": BASE, "prompt": "name: Ada", "max_tokens": 5, "ignore_eos": True}
        with closing(Stream(http, {**streamed, "stream_options": {"include_usage": True}})) as stream:
            usages.append(stream.rest()[-1]["usage"])
        assert http.post("/v1/completions", json={"model": "no-such-adapter", "prompt": "hi"}).status_code == 404
        text = http.get("/metrics").text
        after = scrape(http)
    return before, after, usages, text


def test_every_metric_is_exposed(traffic):
    _, after, _, _ = traffic
    names = {name for name, _ in after}

    missing = [name for name in METRIC_NAMES if name not in names and f"{name}_count" not in names]
    assert missing == []


def test_each_finished_request_counts_once_as_length(traffic):
    before, after, usages, _ = traffic

    assert grew(before, after, "loraplex_requests_total", status="length") == len(usages)
    assert grew(before, after, "loraplex_requests_total", status="stop") == 0


def test_unknown_model_counts_as_invalid(traffic):
    before, after, _, _ = traffic

    assert grew(before, after, "loraplex_requests_total", status="invalid") == 1


@pytest.mark.parametrize(
    ("metric", "labels", "usage_key"),
    [
        ("loraplex_prompt_tokens_total", {}, "prompt_tokens"),
        ("loraplex_generation_tokens_total", {}, "completion_tokens"),
        ("loraplex_tenant_tokens_total", {"tenant": "default", "kind": "prompt"}, "prompt_tokens"),
        ("loraplex_tenant_tokens_total", {"tenant": "default", "kind": "generation"}, "completion_tokens"),
    ],
    ids=["prompt", "generation", "tenant-prompt", "tenant-generation"],
)
def test_token_counter_matches_the_usage_reported(traffic, metric, labels, usage_key):
    before, after, usages, _ = traffic

    assert grew(before, after, metric, **labels) == sum(usage[usage_key] for usage in usages)


def test_time_to_first_token_is_observed_once_per_request(traffic):
    before, after, usages, _ = traffic

    assert grew(before, after, "loraplex_time_to_first_token_seconds_count") == len(usages)


def test_adapter_slot_metrics_show_the_load_and_max_loras(traffic):
    _, after, _, _ = traffic

    assert value(after, "loraplex_adapter_loads_total") >= 1
    assert value(after, "loraplex_adapter_slots_total") == MAX_LORAS


def test_lora_requests_info_is_one_series_labelled_with_max_loras(traffic):
    _, after, _, _ = traffic
    series = [dict(labels) for name, labels in after if name == "loraplex_lora_requests_info"]

    assert len(series) == 1
    assert series[0]["max_lora"] == str(MAX_LORAS)


def test_live_exposition_passes_promtool(traffic):
    promtool = require_promtool()
    _, _, _, text = traffic

    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60, check=False)

    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and problems == "", problems


def test_lora_requests_info_names_the_adapter_of_a_running_request(client):
    with long_streams(client, 1, model=ADAPTER):
        samples = scrape(client)

    (labels,) = [dict(labels) for name, labels in samples if name == "loraplex_lora_requests_info"]
    assert ADAPTER in labels["running_lora_adapters"].split(",")

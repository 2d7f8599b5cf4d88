"""The engine in a process of its own (`EngineClient` and core_process.py), as `loraplex serve` runs it.

The HTTP routes run over it in test_api_openai.py and test_api_load.py (each module once per engine
mode: PEFT-identical tokens, streaming, cancellation, the 429 queue, metrics). Here: what only the
process split has. The client refuses what the engine would, with the same errors; the queue bound
counts across the pipe and gives places back; stop aborts and reaps; a start-up failure keeps its
class; adapter versions cross the pipe; and a dead engine process fails every open request and
turns /health 503 instead of hanging anyone.
"""

import os
import signal
import time

import httpx
import openai
import pytest

from live_server import LiveServer, server_config, upload
from loraplex.config import EngineConfig
from loraplex.engine.client import EngineClient
from loraplex.engine.request import FinishReason, SamplingParams
from loraplex.errors import AdapterNotFound, ModelLoadError, QueueFull, RequestInvalid

DEADLINE = 30.0  # seconds any awaited change may take on a loaded 2-core machine
LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {DEADLINE}s"
        time.sleep(0.01)


def engine_config(llama, **fields) -> EngineConfig:
    return EngineConfig(model=str(llama.model_dir), dtype="float32", device="cpu", max_loras=2, max_model_len=2048, **fields)


@pytest.fixture(scope="module")
def client(llama):
    engine = EngineClient(engine_config(llama, max_num_seqs=1, max_queue=2))
    engine.start()
    yield engine
    engine.stop()


def test_the_client_refuses_what_the_engine_would_with_the_same_errors(client, llama):
    with pytest.raises(RequestInvalid, match="empty"):
        client.add_request([])
    with pytest.raises(RequestInvalid, match="max_model_len is 2048"):
        client.add_request([1] * 2048)
    with pytest.raises(RequestInvalid, match=r"in \[0, 256\)"):
        client.add_request([1, 256])
    with pytest.raises(AdapterNotFound, match="not loaded"):
        client.add_request([1, 2], "nobody")
    first = client.load_adapter("versioned", llama.adapter_dirs["r4-qv"])
    client.load_adapter("versioned", llama.adapter_dirs["r8-attn"])
    with pytest.raises(AdapterNotFound, match="replaced or removed"):
        client.add_request([1, 2], first)
    client.remove_adapter("versioned")
    with pytest.raises(AdapterNotFound):
        client.remove_adapter("versioned")


def test_the_queue_bound_holds_across_the_pipe_and_gives_places_back(client):
    """max_num_seqs 1, max_queue 2: one request runs, two wait, the next is refused; then all is free."""
    endings = {}

    def sink_for(request_id):
        return lambda event: endings.setdefault(request_id, event.finish_reason) if event.finish_reason else None

    added = []
    with pytest.raises(QueueFull):
        for index in range(4):  # the running one was admitted (a place back) or not yet: four adds fill it
            request_id = f"q{index}"
            client.add_request([1, 2, 3], None, LONG, request_id, sink_for(request_id))
            added.append(request_id)
    assert 2 <= len(added) <= 3
    client.abort_all()
    wait_until(lambda: set(endings) == set(added), "every queued request aborted")
    assert set(endings.values()) == {FinishReason.ABORT}
    wait_until(lambda: client.snapshot.num_waiting == 0 and client.snapshot.num_running == 0, "idle")
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for index in range(2):  # the places came back: the bound is 2 again, not 0
        client.add_request([1, 2, 3], None, short, f"again{index}", sink_for(f"again{index}"))
    wait_until(lambda: {"again0", "again1"} <= set(endings), "both short requests done")
    assert endings["again0"] is endings["again1"] is FinishReason.LENGTH


def test_stop_aborts_what_runs_and_the_process_exits(llama):
    engine = EngineClient(engine_config(llama))
    engine.start()
    events = []
    engine.add_request([5, 6, 7], None, LONG, "long", events.append)
    wait_until(lambda: events, "a first token")
    engine.stop()
    assert events[-1].finish_reason is FinishReason.ABORT
    assert 1 <= len([e for e in events if e.token_id is not None]) < LONG.max_tokens
    assert not engine.alive
    with pytest.raises(ProcessLookupError):
        os.kill(engine.pid, 0)


def test_a_start_up_failure_is_raised_as_the_class_the_engine_raised(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as caught:
        EngineClient(EngineConfig(model=str(tmp_path), device="cpu"))
    assert "model_type '' is not supported" in str(caught.value)


@pytest.fixture
def process_server(llama, tmp_path):
    config = server_config(llama.model_dir, tmp_path / "adapters", engine_process=True, max_model_len=2048)
    with LiveServer(config) as live:
        yield live


def test_adapter_versions_cross_to_the_engine_process(process_server, llama, oracle, tokenizer):
    prompt = [5, 17, 99, 42, 8]
    sdk = openai.OpenAI(base_url=process_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with httpx.Client(base_url=process_server.url, timeout=60) as http:
        for source in ("r4-qv", "r16-mlp"):  # the second upload replaces the first under one name
            assert upload(http, "tenant", llama.adapter_dirs[source], overwrite=True).status_code in (200, 201)
            expected, _ = oracle.generate(prompt, source, 8)
            response = sdk.completions.create(model="tenant", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), source
        assert http.delete("/v1/adapters/tenant").status_code == 200
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="tenant", prompt=prompt, max_tokens=2)


def test_a_killed_engine_process_fails_open_requests_and_turns_health_503(process_server):
    with httpx.Client(base_url=process_server.url, timeout=60) as http:
        body = {"model": "tiny-base", "prompt": "hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(process_server.engine.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" or "error" in rest[-1]
        assert any("engine" in line and "error" in line for line in rest), rest[-3:]
        wait_until(lambda: http.get("/health").status_code == 503, "/health 503")
        assert "engine stopped" in http.get("/health").json()["status"]
        refused = http.post("/v1/completions", json={"model": "tiny-base", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert "engine" in refused.json()["error"]["message"]

"""`loraplex serve` as a real process: start-up report, SIGTERM drain, adapters across a restart and a kill -9."""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from live_server import upload
from tiny import make_model

STARTUP_SECONDS = 300  # `serve` became healthy in 13 s alone, in over 100 s on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`python -m loraplex serve ...` with its stderr collected, stopped at the end of the test."""

    def __init__(self, model_dir, store, port: int, **variables: str):
        env = {**os.environ, "LORAPLEX_MAX_MODEL_LEN": "512", "LORAPLEX_DTYPE": "float32", **variables}
        args = ["serve", "--model", str(model_dir), "--adapters", str(store), "--port", str(port)]
        # A drain timeout no loaded machine reaches: the drained request must finish, not race it.
        args += ["--served-model-name", "tiny-base", "--device", "cpu", "--drain-timeout", "300"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraplex", *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self.output}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve did not become healthy:\n{self.output}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture()
def slow_model(tmp_path):
    """Big enough that a few hundred tokens take seconds on a CPU, so a drain has something to wait for."""
    return make_model(tmp_path / "base", "llama", seed=3, hidden_size=512, intermediate_size=1024, num_hidden_layers=4)


def test_serve_reports_start_up_and_drains_on_sigterm(slow_model, llama, tmp_path):
    store = tmp_path / "store"
    server = ServeProcess(slow_model, store, free_port())
    try:
        server.wait_ready()
        for expected in ("model: tiny-base", "device: cpu", "quantization: none", "listening on http://127.0.0.1:"):
            assert expected in server.output
        assert "warning" in server.output and "no --api-keys" in server.output
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(
            model="tiny-base", prompt="drain me", max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(iter(stream))]
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "health did not turn 503 while draining"
            time.sleep(0.05)
        refused = httpx.post(server.url + "/v1/completions", json={"model": "tiny-base", "prompt": "x"}, timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        chunks.extend(stream)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"], "the running request finished normally during the drain"
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()


def test_uploaded_adapters_are_served_again_after_a_restart(llama, tmp_path):
    store, port = tmp_path / "store", free_port()
    first = ServeProcess(llama.model_dir, store, port)
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=60) as http:
            assert upload(http, "kept", llama.adapter_dirs["r8-attn"]).status_code == 201
            before = http.get("/v1/adapters/kept").json()
            request = {"model": "kept", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            text = http.post("/v1/completions", json=request).json()["choices"][0]["text"]
    finally:
        assert first.stop() == 0
    second = ServeProcess(llama.model_dir, store, port)
    try:
        second.wait_ready()
        assert "kept" in second.output
        with httpx.Client(base_url=second.url, timeout=60) as http:
            assert http.get("/v1/adapters/kept").json() == before
            assert http.post("/v1/completions", json=request).json()["choices"][0]["text"] == text
    finally:
        second.stop()


def digest(directory) -> str:
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return hashlib.sha256(b"".join(path.name.encode() + path.read_bytes() for path in files)).hexdigest()


def test_kill_9_during_adapter_loads_and_evictions_leaves_every_adapter_intact(llama, tmp_path):
    store, port = tmp_path / "store", free_port()
    specs = {f"k{index}-{spec}": spec for index in range(2) for spec in ("r4-qv", "r8-attn", "r16-mlp")}
    for name, spec in specs.items():
        shutil.copytree(llama.adapter_dirs[spec], store / name)
    before = {name: digest(store / name) for name in specs}
    request = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    # One slot and host room for less than one adapter: every switch is a read from disk and an eviction.
    tight = {"LORAPLEX_MAX_LORAS": "1", "LORAPLEX_MAX_CPU_LORA_BYTES": "1000"}
    first = ServeProcess(llama.model_dir, store, port, **tight)
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=60) as http:
            texts = {name: http.post("/v1/completions", json={**request, "model": name}).json()["choices"][0]["text"] for name in specs}
            evictions = re.search(r'^loraplex_adapter_tier_evictions_total\{tier="host"\} (\S+)$', http.get("/metrics").text, re.M)
            assert float(evictions[1]) >= len(specs) - 1
            children = psutil.Process(first.process.pid).children(recursive=True)
            flood = [
                threading.Thread(target=_quietly, args=(http, {**request, "model": name})) for name in list(specs) * 3
            ]
            for thread in flood:
                thread.start()
            time.sleep(0.5)  # reads and evictions under way
            for process in [first.process, *children]:
                os.kill(process.pid, signal.SIGKILL)
            for thread in flood:
                thread.join(timeout=60)
        first.process.wait(timeout=30)
        psutil.wait_procs(children, timeout=30)
    finally:
        first.stop()
    assert {name: digest(store / name) for name in specs} == before
    second = ServeProcess(llama.model_dir, store, port, **tight)
    try:
        second.wait_ready()
        with httpx.Client(base_url=second.url, timeout=60) as http:
            assert {entry["id"] for entry in http.get("/v1/models").json()["data"]} >= set(specs)
            again = {name: http.post("/v1/completions", json={**request, "model": name}).json()["choices"][0]["text"] for name in specs}
        assert again == texts
    finally:
        second.stop()


def _quietly(http: httpx.Client, body: dict) -> None:
    try:
        http.post("/v1/completions", json=body)
    except httpx.HTTPError:  # the server is killed under it
        pass

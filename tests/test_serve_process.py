"""`loraplex serve` as a real process: start-up report, SIGTERM drain, adapters across a restart."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
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

    def __init__(self, model_dir, store, port: int):
        env = {**os.environ, "LORAPLEX_MAX_MODEL_LEN": "512", "LORAPLEX_DTYPE": "float32"}
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

"""A live server set up to be attacked, and the checks that it came through unchanged.

Owns: `HostileServer` (a real server on 127.0.0.1 with API keys for two tenants, an admin and a
metrics scraper, a small queue and small body limits, one adapter per tenant), the reference
outputs every attack must leave intact (each tenant's greedy completion, run alone before any
attack), and `assert_unharmed`, which checks what an attack must not leave behind: a queue place,
a KV block, a slot reference, a request in flight, a changed answer, a slow `/health`.
"""

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from live_server import LiveServer, server_config, upload

BASE = "tiny-base"
ACME, GLOBEX, ADMIN, SCRAPER = "sk-acme-0f3c9a71", "sk-globex-5b2e8d40", "sk-admin-9d41c6e2", "sk-metrics-4c1d7e20"
MAX_QUEUE = 4
MAX_REQUEST_BYTES = 64 * 1024
MAX_ADAPTER_BYTES = 256 * 1024
HEALTH_SECONDS = 0.1
REFERENCE_PROMPT = [17, 42, 99, 5, 130, 64]
# (model, key): each tenant's adapter and the base model, as their owners call them.
REFERENCES = (("acme-a", ACME), ("globex-b", GLOBEX), (BASE, ACME))

KEYS_FILE = f"""
[[keys]]
key = "{ACME}"
tenant = "acme"

[[keys]]
key = "{GLOBEX}"
tenant = "globex"

[[keys]]
key = "{ADMIN}"
tenant = "operators"
role = "admin"

[[keys]]
key = "{SCRAPER}"
tenant = "monitoring"
role = "metrics"
"""


def auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def greedy(client: httpx.Client, model: str, key: str, max_tokens: int = 8) -> str:
    body = {"model": model, "prompt": REFERENCE_PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@dataclass
class HostileServer:
    live: LiveServer
    lora_root: Path
    references: dict[str, str]  # model -> its greedy text, run alone before any attack

    @property
    def url(self) -> str:
        return self.live.url

    @property
    def engine(self):
        return self.live.engine

    def client(self, key: str | None = ACME) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth(key), timeout=60)


@contextmanager
def hostile_server(setup, root: Path) -> Iterator[HostileServer]:
    """The server, with acme's adapter `acme-a` and globex's `globex-b` uploaded and references taken."""
    keys = root / "keys.toml"
    keys.write_text(KEYS_FILE)
    lora_root = root / "lora-root"
    lora_root.mkdir()
    config = server_config(setup.model_dir, root / "store", api_keys=keys, max_queue=MAX_QUEUE, max_num_seqs=4)
    config = config.model_copy(update={
        "lora_roots": (lora_root,), "max_request_bytes": MAX_REQUEST_BYTES, "max_adapter_bytes": MAX_ADAPTER_BYTES,
        "metrics_auth": "key", "chat_template_timeout": 1.0,
    })  # fmt: skip
    with LiveServer(config) as live:
        for name, key, spec in (("acme-a", ACME, "r4-qv"), ("globex-b", GLOBEX, "r8-attn")):
            with httpx.Client(base_url=live.url, headers=auth(key), timeout=60) as client:
                response = upload(client, name, setup.adapter_dirs[spec])
                assert response.status_code == 201, response.text
        with httpx.Client(base_url=live.url, timeout=60) as client:
            texts = {model: greedy(client, model, key) for model, key in REFERENCES}
        yield HostileServer(live, lora_root, texts)


def wait_until(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def health_seconds(url: str) -> float:
    """One `GET /health` on a new connection, as a load balancer's probe makes it: connect to answer.

    A plain socket, not an HTTP client: creating an httpx client alone costs tens of milliseconds.
    """
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    elapsed = time.perf_counter() - started
    assert response.startswith(b"HTTP/1.1 200"), response
    return elapsed


def assert_unharmed(server: HostileServer) -> None:
    """Nothing held, nothing changed: queue, KV, slots and in-flight count back to zero, answers intact."""
    engine, services = server.engine, server.live.services
    released = wait_until(
        lambda: engine._queued == 0
        and engine.kv_cache.allocator.usage == 0
        and services.in_flight == 0
        and all(engine.slots.refcount(adapter) == 0 for adapter in engine.adapters.values())
    )
    assert released, (engine._queued, engine.kv_cache.allocator.usage, services.in_flight)
    assert engine.alive and engine.failure is None
    assert min(health_seconds(server.url) for _ in range(3)) < HEALTH_SECONDS
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert {model: greedy(client, model, key) for model, key in REFERENCES} == server.references

"""Hostile requests against a live server: each gets a 4xx naming its problem, and leaves nothing behind.

One server (tests/hostile.py: keys for two tenants, an admin and a metrics scraper, a queue of 4,
a 64 KiB body limit) takes every attack in the table; after each one the server must hold no
queue place, KV block, slot reference or in-flight request, answer `/health` in under 100 ms,
and give every tenant the same greedy text it gave before any attack.
"""

import dataclasses
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from hostile import (
    ACME,
    ADMIN,
    BASE,
    GLOBEX,
    HEALTH_SECONDS,
    MAX_QUEUE,
    MAX_REQUEST_BYTES,
    SCRAPER,
    assert_unharmed,
    auth,
    greedy,
    health_seconds,
    hostile_server,
)
from loraplex.lora.adapter import read_adapter_dir
from loraplex.tenancy import Principal

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MERGE, LOAD, UNLOAD = "/v1/adapters/merge", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
GOOD = {
    COMPLETIONS: {"model": BASE, "prompt": "hello", "max_tokens": 4},
    CHAT: {"model": BASE, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
    MERGE: {"name": "acme-merged", "adapters": ["acme-a", "acme-a"], "weights": [1, 1], "method": "cat"},
    LOAD: {"lora_name": "from-path", "lora_path": "somewhere"},
    UNLOAD: {"lora_name": "from-path"},
}
UNCHECKED = object()


@dataclass(frozen=True)
class Attack:
    """One hostile request: fields laid over the route's good body (None removes one), raw JSON
    members spliced in (for what `json.dumps` will not write: NaN, lone surrogates), or raw bytes."""

    id: str
    route: str
    fields: dict = field(default_factory=dict)
    splice: str | None = None  # raw JSON members, e.g. '"temperature": NaN', added to the good body
    raw: bytes | None = None
    key: str | None = ACME
    headers: tuple[tuple[str, str], ...] = ()
    status: int = 400
    keyword: str = ""
    param: object = UNCHECKED

    def send(self, client: httpx.Client) -> httpx.Response:
        headers = [("content-type", "application/json"), *self.headers]
        if self.key is not None and not any(name.lower() == "authorization" for name, _ in self.headers):
            headers.append(("authorization", f"Bearer {self.key}"))
        return client.post(self.route, content=self.body(), headers=headers)

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        body = {**GOOD[self.route], **self.fields}
        text = json.dumps({key: value for key, value in body.items() if value is not None})  # None: left to the splice
        if self.splice is not None:
            text = text[:-1] + ", " + self.splice + "}"
        return text.encode()


def numbers(route: str, cases: list[tuple[str, dict, str]]) -> list[Attack]:
    return [Attack(id, route, fields, keyword=param, param=param) for id, fields, param in cases]


NUMBERS = [
    *numbers(COMPLETIONS, [
        ("seed-2^64", {"seed": 2**64}, "seed"),
        ("seed-below-int64", {"seed": -(2**63) - 1}, "seed"),
        ("top-k-2^63", {"top_k": 2**63}, "top_k"),
        ("max-tokens-2^63", {"max_tokens": 2**63}, "max_tokens"),
        ("n-2^40", {"n": 2**40}, "n"),
        ("best-of-2^40", {"best_of": 2**40}, "best_of"),
        ("logprobs-2^31", {"logprobs": 2**31}, "logprobs"),
        ("stop-token-id-2^63", {"stop_token_ids": [2**63]}, "stop_token_ids"),
        ("prompt-token-id-2^63", {"prompt": [2**63]}, "prompt"),
        ("prompt-token-id-past-vocab", {"prompt": [2**31 - 1]}, "prompt"),
        ("too-many-stop-strings", {"stop": ["x"] * 17}, "stop"),
        ("stop-string-too-long", {"stop": "x" * 1025}, "stop"),
        ("too-many-prompts", {"prompt": ["a"] * 65}, "prompt"),
    ]),  # fmt: skip
    *numbers(CHAT, [
        ("seed-2^64", {"seed": 2**64}, "seed"),
        ("top-k-2^63", {"top_k": 2**63}, "top_k"),
        ("max-completion-tokens-2^63", {"max_completion_tokens": 2**63}, "max_completion_tokens"),
        ("top-logprobs-2^31", {"logprobs": True, "top_logprobs": 2**31}, "top_logprobs"),
    ]),  # fmt: skip
    *numbers(MERGE, [
        ("seed-2^70", {"seed": 2**70}, "seed"),
        ("seed-negative", {"seed": -1}, "seed"),
        ("weight-1e308", {"weights": [1e308, 1]}, "weights"),
        ("rank-2^62", {"method": "svd", "rank": 2**62}, "rank"),
        ("density-above-1", {"method": "ties", "density": 2.0}, "density"),
        ("too-many-adapters", {"adapters": ["acme-a"] * 17, "weights": [1] * 17}, "adapters"),
    ]),  # fmt: skip
    Attack("unload-int-id-2^64", UNLOAD, {"lora_int_id": 2**64}, key=ADMIN, keyword="lora_int_id", param="lora_int_id"),
    *[  # Python's parser reads these; no standard JSON parser does, and no field may hold them
        Attack(f"{route.rsplit('/', 1)[-1]}-{name}-{literal}", route, splice=f'"{name}": {literal}',
               keyword=f"{literal.lstrip('-')} is not a JSON number", param=None)
        for route in (COMPLETIONS, CHAT)
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")
        for literal in ("NaN", "Infinity", "-Infinity")
    ],  # fmt: skip
    Attack("merge-weight-nan", MERGE, {"weights": [1]}, splice='"weight_list": [NaN, 1]', keyword="NaN is not a JSON number"),
    Attack("logit-bias-nan", COMPLETIONS, splice='"logit_bias": {"5": NaN}', keyword="NaN is not a JSON number"),
    Attack("a-key-twice", COMPLETIONS, splice='"model": "acme-a"', keyword="'model' appears twice", param=None),
    Attack("a-nested-key-twice", CHAT, {"messages": None},
           splice='"messages": [{"role": "user", "content": "hi", "content": "bye"}]', keyword="'content' appears twice"),
]  # fmt: skip

SURROGATE = '"\\ud800"'  # JSON for a lone surrogate: valid JSON, not valid Unicode
UNICODE = [
    Attack("completion-prompt", COMPLETIONS, {"prompt": None}, splice=f'"prompt": {SURROGATE}', keyword="prompt", param="prompt"),
    Attack("completion-prompt-list", COMPLETIONS, {"prompt": None}, splice=f'"prompt": ["ok", {SURROGATE}]', keyword="prompt"),
    Attack("completion-stop", COMPLETIONS, splice=f'"stop": {SURROGATE}', keyword="stop", param="stop"),
    Attack("completion-user", COMPLETIONS, splice=f'"user": {SURROGATE}', keyword="user", param="user"),
    Attack("completion-model", COMPLETIONS, {"model": None}, splice=f'"model": {SURROGATE}', keyword="model", param="model"),
    Attack(
        "chat-content", CHAT, {"messages": None}, splice=f'"messages": [{{"role": "user", "content": {SURROGATE}}}]',
        keyword="content", param="messages.0.content",
    ),  # fmt: skip
    Attack(
        "chat-text-part", CHAT, {"messages": None},
        splice=f'"messages": [{{"role": "user", "content": [{{"type": "text", "text": {SURROGATE}}}]}}]', keyword="messages",
    ),  # fmt: skip
    Attack(
        "chat-name", CHAT, {"messages": None}, splice=f'"messages": [{{"role": "user", "content": "hi", "name": {SURROGATE}}}]',
        keyword="name", param="messages.0.name",
    ),  # fmt: skip
    Attack("load-path-surrogate", LOAD, {"lora_path": None}, splice=f'"lora_path": {SURROGATE}', key=ADMIN, keyword="lora_path"),
    Attack("load-path-nul", LOAD, {"lora_path": "adapters/\u0000x"}, key=ADMIN, keyword="lora_path", param="lora_path"),
    Attack("load-name-surrogate", LOAD, {"lora_name": None}, splice=f'"lora_name": {SURROGATE}', key=ADMIN, keyword="lora_name"),
    Attack("body-not-utf8", COMPLETIONS, raw=b'{"model": "tiny-base", "prompt": "\xff\xfe"}', keyword="body"),
]

BODIES_AND_KEYS = [
    Attack("nested-50000-deep", COMPLETIONS, raw=b"[" * 50000, keyword="nested"),
    Attack("body-over-the-limit", COMPLETIONS, {"prompt": "x" * MAX_REQUEST_BYTES}, status=413, keyword="max-request-bytes"),
    Attack("no-key", COMPLETIONS, key=None, status=401, keyword="API key"),
    Attack("unknown-key", COMPLETIONS, key="sk-nobody-00000000", status=401, keyword="unknown"),
    Attack(
        "two-authorization-headers", COMPLETIONS,
        headers=(("authorization", f"Bearer {ACME}"), ("authorization", f"Bearer {GLOBEX}")), keyword="Authorization",
    ),  # fmt: skip
    Attack("metrics-key-on-a-v1-route", COMPLETIONS, key=SCRAPER, status=403, keyword="metrics"),
    Attack("tenant-on-an-admin-route", LOAD, status=403, keyword="admin"),
]

SMALL_ONES = [
    Attack("n-over-max-queue", COMPLETIONS, {"n": MAX_QUEUE + 1}, keyword="never run", param="n"),
    Attack("prompts-times-n-over-max-queue", COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 2}, keyword="never run", param="n"),
    Attack("chat-n-over-max-queue", CHAT, {"n": MAX_QUEUE + 1}, keyword="never run", param="n"),
    Attack("prompt-empty-string", COMPLETIONS, {"prompt": ""}, keyword="prompt", param="prompt"),
    Attack("prompt-list-with-an-empty-string", COMPLETIONS, {"prompt": ["ok", ""]}, keyword="prompt", param="prompt"),
    Attack("prompt-empty-list", COMPLETIONS, {"prompt": []}, keyword="prompt", param="prompt"),
    Attack("another-tenants-adapter", COMPLETIONS, {"model": "globex-b"}, status=404, keyword="does not exist"),
]

TABLE = [pytest.param(attack, id=f"{group}-{attack.id}") for group, attacks in (
    ("numbers", NUMBERS), ("unicode", UNICODE), ("bodies", BODIES_AND_KEYS), ("small", SMALL_ONES),
) for attack in attacks]  # fmt: skip


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    with hostile_server(llama, tmp_path_factory.mktemp("hostile")) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("attack", TABLE)
def test_a_hostile_request_gets_a_4xx_naming_its_problem_and_harms_nothing(server, client, attack):
    error = error_of(attack.send(client), attack.status)

    assert attack.keyword.lower() in error["message"].lower(), error
    if attack.param is not UNCHECKED:  # the field, or a dotted path into it (stop_token_ids.0)
        assert error["param"] == attack.param or error["param"].startswith(f"{attack.param}."), error
    assert_unharmed(server)


def poisoned_adapter(server, llama) -> str:
    """acme's adapter with NaN weights, registered past validation (as a validation bug would let it in)."""
    catalog = server.live.services.catalog
    record = catalog.load_path("acme-poison", str(copy_into_root(server, llama, "r8-attn")), Principal("ops", "admin"))
    engine = server.live.services.engine
    poisoned = engine.validate_adapter("acme-poison", *read_adapter_dir(record.path))
    for weights in poisoned.modules.values():
        weights.lora_b[0, 0] = float("nan")
    engine.register_adapter(poisoned)  # built in memory: its tensors cross to the engine as they are
    catalog._records["acme-poison"] = dataclasses.replace(record, adapter=poisoned, owner="acme")
    return "acme-poison"


def copy_into_root(server, llama, spec: str):
    target = server.lora_root / spec
    if not target.exists():
        shutil.copytree(llama.adapter_dirs[spec], target)
    return target


def test_failing_requests_many_times_the_queue_bound_hold_no_place_and_normal_ones_then_run(server, client, llama):
    """The failures come at every stage: refused at the door, refused by the engine, failed inside a
    step (an adapter that got past validation with NaN weights), cut by a client walking away."""
    failing = [
        Attack("seed", COMPLETIONS, {"seed": 2**64}),
        Attack("token-past-vocab", COMPLETIONS, {"prompt": [2**31 - 1]}),
        Attack("n-too-large", COMPLETIONS, {"n": MAX_QUEUE + 1}),
    ]
    poisoned = poisoned_adapter(server, llama)
    for _ in range(3 * MAX_QUEUE):
        for attack in failing:
            assert attack.send(client).status_code == 400
        failed_in_the_engine = client.post(COMPLETIONS, json={**GOOD[COMPLETIONS], "model": poisoned}, headers=auth(ACME))
        assert "not finite" in error_of(failed_in_the_engine, 500)["message"]
        with httpx.Client(base_url=server.url, timeout=60) as gone:  # a stream its client walks away from
            body = {"model": BASE, "prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
            with gone.stream("POST", COMPLETIONS, json=body, headers=auth(ACME)) as stream:
                next(stream.iter_lines())

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(greedy(client, BASE, ACME))) for _ in range(MAX_QUEUE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [server.references[BASE]] * MAX_QUEUE, "every one ran: no place was held by a failed request"
    server.live.services.catalog.unload(poisoned, Principal("ops", "admin"))
    assert_unharmed(server)


def test_a_temperature_too_small_to_divide_by_samples_greedily(server, client):
    body = {"model": "acme-a", "prompt": [17, 42, 99, 5, 130, 64], "max_tokens": 8, "ignore_eos": True}
    texts = [
        client.post(COMPLETIONS, json={**body, "temperature": temperature}, headers=auth(ACME)).json()["choices"][0]["text"]
        for temperature in (1e-40, 5e-324, 0)
    ]
    assert texts == [server.references["acme-a"]] * 3


def raw_exchange(url: str, request: bytes, reads: int = 1) -> list[bytes]:
    """Send `request` bytes on one socket; return each HTTP response read (by Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    responses = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        buffer = b""
        for _ in range(reads):
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the connection after {len(responses)} responses"
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            while len(buffer) < length:
                buffer += sock.recv(65536)
            responses.append(head + b"\r\n\r\n" + buffer[:length])
            buffer = buffer[length:]
    return responses


@pytest.mark.parametrize(("key", "status"), [(None, b"401"), (ACME, b"413")])
def test_a_declared_300_mib_body_is_answered_before_a_byte_of_it_is_read(server, key, status):
    header = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\n{header}Content-Type: application/json\r\n"
        f"Content-Length: {300 * 2**20}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    (response,) = raw_exchange(server.url, request)  # no body follows: only the headers were judged
    assert response.split(b" ")[1] == status, response
    assert time.monotonic() - started < 10
    assert_unharmed(server)


def test_a_body_without_a_length_is_cut_at_the_limit_without_growing_memory(server):
    process = psutil.Process()
    before = process.memory_info().rss

    def chunks():
        for _ in range(512):  # 64 MiB, chunked: no Content-Length to refuse early
            yield b"x" * (128 * 1024)

    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post(COMPLETIONS, content=chunks(), headers={**auth(ACME), "content-type": "application/json"})
    error = error_of(response, 413)
    assert "max-request-bytes" in error["message"]
    assert process.memory_info().rss - before < 32 * 2**20
    assert_unharmed(server)


def test_a_500_answers_in_the_error_shape_and_keeps_the_connection_alive(server, monkeypatch):
    def broken(principal):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.live.services.catalog, "visible_to", broken)
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n\r\n".encode()
    monkeypatched, healthy = raw_exchange(server.url, request + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", reads=2)
    assert monkeypatched.startswith(b"HTTP/1.1 500") and b'"internal server error"' in monkeypatched
    assert b"a bug" not in monkeypatched, "no internals leak"
    assert healthy.startswith(b"HTTP/1.1 200"), "the same connection served the next request"


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), (ACME, 403), (SCRAPER, 200), (ADMIN, 200)], ids=["none", "tenant", "metrics", "admin"]
)
def test_metrics_protected_by_key_are_read_by_metrics_and_admin_keys_only(server, key, status):
    response = httpx.get(f"{server.url}/metrics", headers=auth(key), timeout=30)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.headers["content-type"].startswith("text/plain")
        assert "loraplex_tenant_tokens_total" in response.text


def test_health_answers_within_100_ms_while_hostile_work_runs(server, llama):
    """A chat template that spins in its sandbox and an adapter whose patterns backtrack, uploaded together."""
    adapter_dir = llama.adapter_dirs["r4-qv"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    backtracking = json.dumps({**config, "rank_pattern": {"(?:.*?){20}(?!)": 4}})
    files = {"weights": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())}
    spinning = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    uploads = [
        ({**files, "config": ("adapter_config.json", json.dumps(config))}, {"name": "spins", "chat_template": spinning}),
        ({**files, "config": ("adapter_config.json", backtracking)}, {"name": "backtracks"}),
    ]
    responses, probes, done = [], [], threading.Event()

    def send(form) -> None:
        with server.client(ACME) as http:
            responses.append(http.post("/v1/adapters", files=form[0], data=form[1]))

    def probe() -> None:
        while not done.is_set():
            probes.append(health_seconds(server.url))
            time.sleep(0.02)

    senders = [threading.Thread(target=send, args=(form,)) for form in uploads]
    prober = threading.Thread(target=probe)
    prober.start()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=60)
    done.set()
    prober.join()

    messages = sorted(error_of(response, 422)["message"] for response in responses)
    assert "rank_pattern" in messages[0] and "take more than 1 s" in messages[0], messages
    assert "chat template" in messages[1] and "longer than 1 s" in messages[1], messages
    # Blocked by the validation, a probe would wait for all of it (a second and more); on a loaded
    # machine a probe may still be descheduled now and then, so the median is held to 100 ms.
    assert len(probes) >= 5 and sorted(probes)[len(probes) // 2] < HEALTH_SECONDS and max(probes) < 1.0, probes
    assert_unharmed(server)

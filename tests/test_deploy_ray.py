"""The Ray Serve app (deploy/ray/): adapters routed by multiplexing, base requests balanced, same outputs.

Two CPU replicas of the tiny llama, each placed by Ray for one adapter at a time (`max_loras=1`),
behind the router on a local Ray cluster bound to 127.0.0.1; each serves the whole store. Every
response names the replica that served it.
The app's settings are the configs' fields, with the configs' defaults (no cluster needed).
Skipped when `ray[serve]` is not installed (`pip install -e '.[ray]'`).
"""

import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from live_server import LiveServer, server_config
from loraplex.config import EngineConfig, ServerConfig

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

serve_api = pytest.importorskip("ray.serve._private.api")

from deploy.ray.app import RayAppArgs, build_app  # noqa: E402
from deploy.ray.replica import REPLICA_HEADER  # noqa: E402
from test_serve_process import STARTUP_SECONDS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = "tiny-base"
STORE = {"alpha": "r4-qv", "beta": "r8-attn", "gamma": "r16-mlp"}
ROUTING_SETTLE_S = 1.0  # replicas push the adapters they hold every 0.1 s; routers learn soon after
PROMPT = "the quick brown fox"
RAY_PROXY_TIMEOUTS = ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-store")
    for name, spec in STORE.items():
        shutil.copytree(llama.adapter_dirs[spec], root / name)
    return root


@pytest.fixture(scope="module")
def ray_app(llama, store):
    """The app on a fresh local Ray; yields an HTTP client for it; Ray is shut down afterwards."""
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "server"), pythonpath]))
    # Ray Serve gives its HTTP proxy actor 60 s to start and 5 s per readiness check (killing it
    # after three misses); on a loaded 2-core machine it was not even scheduled by then (CI at
    # load 8). The checks' timeouts are read from the environment by the controller Ray starts;
    # the start deadline is Ray's constant, read at call time.
    saved_env = {name: os.environ.get(name) for name in RAY_PROXY_TIMEOUTS}
    os.environ.update({name: str(STARTUP_SECONDS / 3) for name in RAY_PROXY_TIMEOUTS})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    proxy_timeout = serve_api.HTTP_PROXY_TIMEOUT
    serve_api.HTTP_PROXY_TIMEOUT = STARTUP_SECONDS
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = dict(
            model=str(llama.model_dir),
            adapters=str(store),
            served_model_name=BASE,
            num_replicas=2,
            max_loras=1,
            replica_cpus=0.5,
            dtype="float32",
            device="cpu",
            max_model_len=256,
        )
        serve.run(build_app(args), name="loraplex", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()
        serve_api.HTTP_PROXY_TIMEOUT = proxy_timeout
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def test_model_and_adapters_alone_give_the_replicas_the_configs_defaults(tmp_path):
    config = RayAppArgs.model_validate({"model": "/models/base", "adapters": str(tmp_path)}).server_config()
    assert config.engine == EngineConfig(model="/models/base")  # max_queue=256 among them
    assert config == ServerConfig(engine=config.engine, adapters=tmp_path.resolve())


def test_settings_given_as_strings_are_converted_by_the_configs(tmp_path):
    args = {"model": "/m", "adapters": "store", "max_loras": "1", "max_model_len": "256", "dtype": "float32",
            "max_queue": "7", "chat_template_timeout": "3.5", "replica_cpus": "0.5"}  # fmt: skip
    settings = RayAppArgs.model_validate(args)
    config = settings.server_config()
    assert config.engine == EngineConfig(model="/m", max_loras=1, max_model_len=256, dtype="float32", max_queue=7)
    assert (config.chat_template_timeout, config.adapters, settings.replica_cpus) == (3.5, Path("store").resolve(), 0.5)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"port": "9000"}, "port is not a Ray app setting: Ray's proxy listens"),
        ({"api_keys": "keys.toml"}, "api_keys is not a Ray app setting"),
        ({"max_lora": "2"}, "unknown setting max_lora"),
        ({"max_loras": "0"}, "greater than or equal to 1"),
    ],
)
def test_settings_the_replicas_cannot_take_are_refused(setting, message):
    with pytest.raises(ValidationError, match=message):
        RayAppArgs.model_validate({"model": "/m", "adapters": "store", **setting}).server_config()


def complete(client: httpx.Client, model: str, **fields) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def replica_of(client: httpx.Client, model: str) -> str:
    return complete(client, model).headers[REPLICA_HEADER]


def warm(client: httpx.Client, *models: str) -> dict[str, str]:
    """Load each adapter somewhere, one at a time, letting routing learn each placement."""
    placed = {}
    for model in models:
        placed[model] = replica_of(client, model)
        time.sleep(ROUTING_SETTLE_S)
    return placed


def replica_adapters() -> dict[str, dict[str, str]]:
    """Each replica's id -> its registered adapters' tiers, by name (asked until both answer)."""
    handle = serve.get_deployment_handle("LoraplexReplica", app_name="loraplex")
    seen = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only replicas {sorted(seen)} answered"
        state = handle.adapters.remote().result(timeout_s=30)
        seen[state["replica"]] = state["tiers"]
    return seen


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(ray_app):
    home = warm(ray_app, "alpha")["alpha"]
    served = {replica_of(ray_app, "alpha") for _ in range(5)}
    assert served == {home}
    assert replica_adapters()[home]["alpha"] in ("device", "host")  # warm where Ray sends it


def test_two_adapters_are_spread_over_both_replicas(ray_app):
    placed = warm(ray_app, "alpha", "beta")
    served = {model: {replica_of(ray_app, model) for _ in range(3)} for model in ("alpha", "beta", "alpha", "beta")}
    assert served == {"alpha": {placed["alpha"]}, "beta": {placed["beta"]}}
    assert placed["alpha"] != placed["beta"]


def test_the_multiplexing_header_routes_like_the_model_field(ray_app):
    home = warm(ray_app, "alpha")["alpha"]
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    response = ray_app.post("/v1/completions", json=body, headers={"serve_multiplexed_model_id": "alpha"})
    assert response.status_code == 200
    assert response.headers[REPLICA_HEADER] == home


def test_base_requests_are_balanced_over_both_replicas(ray_app):
    served = Counter(replica_of(ray_app, BASE) for _ in range(16))
    assert len(served) == 2, served


def test_every_replica_serves_and_lists_the_whole_store(ray_app):
    answers = [ray_app.get("/v1/models") for _ in range(8)]
    assert {answer.headers[REPLICA_HEADER] for answer in answers} == set(replica_adapters())  # both answered
    for answer in answers:
        assert {entry["id"] for entry in answer.json()["data"]} >= {BASE, *STORE}
    assert all(set(tiers) >= set(STORE) for tiers in replica_adapters().values())


def test_an_adapter_written_to_the_store_is_served_through_ray_within_seconds(ray_app, llama, store):
    shutil.copytree(llama.adapter_dirs["r4-qv"], store / "delta")
    deadline = time.monotonic() + 5
    while "delta" not in {entry["id"] for entry in ray_app.get("/v1/models").json()["data"]}:
        assert time.monotonic() < deadline, "a replica did not list the new adapter within 5 s"
        time.sleep(0.2)
    assert complete(ray_app, "delta").status_code == 200


def test_outputs_equal_a_single_loraplex_servers(ray_app, llama, store):
    requests = [
        ("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        for model in (BASE, "alpha", "beta", "gamma")
    ]
    chat = {"model": "beta", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0}
    requests.append(("/v1/chat/completions", chat))
    with LiveServer(server_config(llama.model_dir, store)) as single, httpx.Client(base_url=single.url, timeout=60) as reference:
        for path, body in requests:
            ours, theirs = ray_app.post(path, json=body), reference.post(path, json=body)
            assert ours.status_code == theirs.status_code == 200, ours.text
            assert text_of(ours.json()) == text_of(theirs.json()), body["model"]


def test_streamed_text_equals_a_single_loraplex_servers(ray_app, llama, store):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with LiveServer(server_config(llama.model_dir, store)) as single, httpx.Client(base_url=single.url, timeout=60) as reference:
        expected = stream_text(reference, body)
    assert stream_text(ray_app, body) == expected


def test_unknown_models_get_loraplexs_404(ray_app):
    response = ray_app.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def text_of(payload: dict) -> str:
    choice = payload["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def stream_text(client: httpx.Client, body: dict) -> str:
    text = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
    return "".join(text)

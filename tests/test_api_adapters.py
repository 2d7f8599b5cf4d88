"""Adapter management over HTTP: upload, list, replace, delete, vLLM's load/unload, and restarts.

A real server (tests/live_server.py) is driven with httpx for management and with the official
`openai` SDK for generation. Greedy outputs are checked against PEFT's own `generate`: the text
and every token's own text (OpenAI's `logprobs.tokens`) must be identical, and each chosen token's
logprob equal within 1e-4. Prompts are token ids, so tokenization is not in question.
"""

import io
import pickle
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from conftest import PeftOracle
from live_server import LiveServer, server_config, upload
from tiny import make_adapter, make_model

BASE = "tiny-base"
PROMPT = [17, 42, 99, 5, 130, 64]
MAX_TOKENS = 8
LONG = 150  # tokens a stream runs for while its adapter is replaced or deleted
LOGPROB_TOL = 1e-4
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class Greedy:
    """What a greedy completion produced.

    Every byte is a token of the tiny tokenizer, and a lone byte above 0x7f prints as "\ufffd", so
    texts alone cannot tell such tokens apart; each chosen token's logprob does.
    """

    text: str
    tokens: list[str]  # each token's own text, as OpenAI's logprobs report it
    logprobs: list[float]  # each chosen token's logprob
    completion_tokens: int


def assert_same_output(got: Greedy, want: Greedy) -> None:
    assert (got.text, got.tokens, got.completion_tokens) == (want.text, want.tokens, want.completion_tokens)
    assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_TOL)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    """The one directory `POST /v1/load_lora_adapter` may read from."""
    return tmp_path_factory.mktemp("lora-root")


@pytest.fixture(scope="module")
def server(llama, lora_root, tmp_path_factory):
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("store"))
    with LiveServer(config.model_copy(update={"lora_roots": (lora_root,)})) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def served(client: openai.OpenAI, model: str, max_tokens: int = MAX_TOKENS) -> Greedy:
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    choice = response.choices[0]
    return Greedy(choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs, response.usage.completion_tokens)


def expected(oracle: PeftOracle, tokenizer, adapter: str | None, max_tokens: int = MAX_TOKENS) -> Greedy:
    """PEFT's greedy output for `adapter` (a conftest.ADAPTER_SPECS name), rendered as the server renders it."""
    ids, logits = oracle.generate(PROMPT, adapter, max_tokens)
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    logprobs = logits.log_softmax(dim=-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
    return Greedy(text, tokenizer.batch_decode([[token] for token in ids]), logprobs, max_tokens)


def open_stream(client: openai.OpenAI, model: str, max_tokens: int):
    return client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )


def finish_stream(chunks) -> tuple[Greedy, str | None]:
    """What a stream produced, and its finish reason."""
    text, tokens, logprobs, finish_reason, completion_tokens = "", [], [], None, 0
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
            finish_reason = choice.finish_reason or finish_reason
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
    return Greedy(text, tokens, logprobs, completion_tokens), finish_reason


class _FirstTokenGate:
    """An engine observer that holds the engine thread at its first token until `release` is set."""

    def __init__(self, inner):
        self.inner = inner
        self.reached, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def token(self, request, gap) -> None:
        self.inner.token(request, gap)
        self.reached.set()
        self.release.wait()


@contextmanager
def held_at_first_token(server: LiveServer):
    """Inside the block, the engine stops at the first token it makes until the block ends.

    Yields an Event set once that token exists: what the block does after waiting for it happens
    while the request that made it is certainly still running.
    """
    engine = server.engine
    gate = _FirstTokenGate(engine.observer)
    engine.observer = gate
    try:
        yield gate.reached
    finally:
        engine.observer = gate.inner
        gate.release.set()


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS
    return body["error"]


# ----- upload, list, show ------------------------------------------------------------------


def test_upload_returns_201_with_the_adapters_metadata(http, llama):
    response = upload(http, "meta", llama.adapter_dirs["r8-attn"])
    assert response.status_code == 201
    record = response.json()
    assert record["name"] == "meta"
    assert (record["rank"], record["alpha"]) == (8, 16)
    assert record["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert record["size_bytes"] > 0
    assert record["owner"] == "default"
    assert isinstance(record["created"], int) and record["created"] > 0


def test_an_uploaded_adapter_is_listed_and_shown(http, llama):
    record = upload(http, "listed", llama.adapter_dirs["r4-qv"]).json()
    listing = http.get("/v1/adapters").json()
    assert record in listing["data"]
    assert http.get("/v1/adapters/listed").json() == record


def test_an_uploaded_adapter_is_on_disk_until_a_request_reads_it_into_a_device_slot(http, client, llama):
    assert upload(http, "tiered", llama.adapter_dirs["r4-qv"]).json()["tier"] == "disk"  # stored, not read back yet
    served(client, "tiered")
    assert http.get("/v1/adapters/tiered").json()["tier"] == "device"  # it stays in its slot until evicted


def test_an_uploaded_adapter_is_a_model_whose_parent_is_the_base(http, llama):
    upload(http, "as-model", llama.adapter_dirs["r4-qv"])
    models = {entry["id"]: entry for entry in http.get("/v1/models").json()["data"]}
    assert models["as-model"]["parent"] == BASE
    assert models["as-model"]["root"]
    assert models[BASE]["parent"] is None


@pytest.mark.parametrize("adapter", ["r4-qv", "r16-mlp", "r8-all-rslora", "r4-patterns"])
def test_an_uploaded_adapter_generates_what_peft_generates(http, client, oracle, tokenizer, llama, adapter):
    assert upload(http, f"peft-{adapter}", llama.adapter_dirs[adapter]).status_code == 201
    assert_same_output(served(client, f"peft-{adapter}"), expected(oracle, tokenizer, adapter))


# ----- replace and delete ------------------------------------------------------------------


def test_uploading_an_existing_name_without_overwrite_is_refused_and_the_old_adapter_stays(http, client, oracle, tokenizer, llama):
    upload(http, "kept", llama.adapter_dirs["r4-qv"])
    before = http.get("/v1/adapters/kept").json()
    error = assert_openai_error(upload(http, "kept", llama.adapter_dirs["r8-attn"]), 409)
    assert "overwrite" in error["message"]
    assert http.get("/v1/adapters/kept").json() == before
    assert_same_output(served(client, "kept"), expected(oracle, tokenizer, "r4-qv"))


def test_overwrite_replaces_the_weights_new_requests_use(http, client, oracle, tokenizer, llama):
    upload(http, "replaced", llama.adapter_dirs["r4-qv"])
    before = served(client, "replaced")
    response = upload(http, "replaced", llama.adapter_dirs["r8-attn"], overwrite=True)
    assert response.status_code == 200
    assert response.json()["rank"] == 8
    after = served(client, "replaced")
    assert_same_output(after, expected(oracle, tokenizer, "r8-attn"))
    assert after != before


def test_a_stream_running_when_its_adapter_is_replaced_finishes_on_the_old_weights(server, http, client, llama):
    upload(http, "hot-swap", llama.adapter_dirs["r4-qv"])
    old = served(client, "hot-swap", LONG)
    with held_at_first_token(server) as first_token:
        stream = open_stream(client, "hot-swap", LONG)
        assert first_token.wait(timeout=30)
        assert upload(http, "hot-swap", llama.adapter_dirs["r8-attn"], overwrite=True).status_code == 200
    streamed, finish_reason = finish_stream(stream)
    assert finish_reason == "length" and streamed.completion_tokens == LONG
    assert_same_output(streamed, old)
    assert served(client, "hot-swap", LONG) != old  # new requests do get the new weights


def test_a_stream_running_when_its_adapter_is_deleted_finishes_on_its_weights(server, http, client, llama):
    upload(http, "doomed", llama.adapter_dirs["r8-attn"])
    old = served(client, "doomed", LONG)
    with held_at_first_token(server) as first_token:
        stream = open_stream(client, "doomed", LONG)
        assert first_token.wait(timeout=30)
        assert http.delete("/v1/adapters/doomed").status_code == 200
    streamed, finish_reason = finish_stream(stream)
    assert finish_reason == "length" and streamed.completion_tokens == LONG
    assert_same_output(streamed, old)


def test_a_deleted_adapter_is_not_found_in_openais_error_shape(http, client, llama):
    upload(http, "gone", llama.adapter_dirs["r4-qv"])
    assert http.delete("/v1/adapters/gone").json() == {"id": "gone", "object": "adapter", "deleted": True}
    with pytest.raises(openai.NotFoundError) as error:
        served(client, "gone")
    assert_openai_error(error.value.response, 404)
    assert_openai_error(http.get("/v1/adapters/gone"), 404)
    assert "gone" not in [entry["id"] for entry in http.get("/v1/models").json()["data"]]


# ----- refused uploads -----------------------------------------------------------------------


def files_of(adapter_dir: Path) -> tuple[bytes, bytes]:
    return (adapter_dir / "adapter_config.json").read_bytes(), (adapter_dir / "adapter_model.safetensors").read_bytes()


def form(name: str, config: bytes, weights: bytes, **fields) -> dict:
    """httpx.post keyword arguments for an upload with these parts."""
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    return {"files": files, "data": {"name": name, **fields}}


def valid(llama) -> tuple[bytes, bytes]:
    return files_of(llama.adapter_dirs["r4-qv"])


def with_tensors(llama, change) -> dict:
    config, weights = valid(llama)
    tensors = load_safetensors(weights)
    change(tensors)
    return form("spoiled", config, save_safetensors(tensors))


def named(name: str):
    return lambda llama, workdir: form(name, *valid(llama))


def garbage_weights(llama, workdir) -> dict:
    return form("garbage", valid(llama)[0], b"\x00\x01 these bytes are no safetensors file " * 32)


def pickled_weights(llama, workdir) -> dict:
    tensors = load_safetensors(valid(llama)[1])
    return form("pickled", valid(llama)[0], pickle.dumps({key: t.tolist() for key, t in tensors.items()}))


def torch_saved_weights(llama, workdir) -> dict:
    buffer = io.BytesIO()
    torch.save(load_safetensors(valid(llama)[1]), buffer)
    return form("torch-saved", valid(llama)[0], buffer.getvalue())


def config_not_json(llama, workdir) -> dict:
    return form("yaml-config", b"r: 4\nlora_alpha: 8\n", valid(llama)[1])


def rank_above_max(llama, workdir) -> dict:
    return form("too-wide", *files_of(llama.adapter_dirs["r16-mlp"]))


def other_base_shapes(llama, workdir) -> dict:
    other_base = make_model(workdir / "other-base", "llama", seed=7, hidden_size=32, intermediate_size=64)
    return form("other-shapes", *files_of(make_adapter(other_base, workdir / "other-adapter", rank=4)))


def non_finite_values(llama, workdir) -> dict:
    def poison(tensors):
        tensors[next(key for key in tensors if "lora_B" in key)][0, 0] = float("nan")

    return with_tensors(llama, poison)


def targets_missing_from_base(llama, workdir) -> dict:
    def rename(tensors):
        for key in list(tensors):
            tensors[key.replace("q_proj", "x_proj")] = tensors.pop(key)

    return with_tensors(llama, rename)


def weights_missing(llama, workdir) -> dict:
    config, _ = valid(llama)
    return {"files": {"config": ("adapter_config.json", config)}, "data": {"name": "half"}}


def name_missing(llama, workdir) -> dict:
    request = form("nameless", *valid(llama))
    del request["data"]["name"]
    return request


def json_body(llama, workdir) -> dict:
    config, _ = valid(llama)
    return {"json": {"name": "as-json", "config": config.decode(), "weights": "AAAA"}}


def unknown_field(llama, workdir) -> dict:
    return form("coloured", *valid(llama), colour="blue")


BAD_UPLOADS = [
    # (the upload, its status, a word its message must contain)
    pytest.param(named("../x"), 400, "name", id="name-with-dotdot"),
    pytest.param(named(".hidden"), 400, "name", id="name-hidden"),
    pytest.param(named("a" * 65), 400, "name", id="name-too-long"),
    pytest.param(named("has space"), 400, "name", id="name-with-space"),
    pytest.param(garbage_weights, 400, "safetensors", id="weights-not-safetensors"),
    pytest.param(pickled_weights, 400, "pickle", id="weights-pickled"),
    pytest.param(torch_saved_weights, 400, "pickle", id="weights-torch-saved"),
    pytest.param(config_not_json, 400, "JSON", id="config-not-json"),
    pytest.param(rank_above_max, 422, "max_lora_rank", id="rank-above-max"),
    pytest.param(other_base_shapes, 422, "shape", id="shapes-of-another-base"),
    pytest.param(non_finite_values, 422, "non-finite", id="nan-in-weights"),
    pytest.param(targets_missing_from_base, 422, "x_proj", id="target-not-in-base"),
    pytest.param(weights_missing, 400, "weights", id="field-weights-missing"),
    pytest.param(name_missing, 400, "name", id="field-name-missing"),
    pytest.param(json_body, 400, "multipart", id="not-multipart"),
    pytest.param(unknown_field, 400, "colour", id="unknown-field"),
]


@pytest.fixture(scope="module")
def strict_server(llama, tmp_path_factory):
    """A server whose slots hold rank 8 at most, so the rank-16 adapter is too wide for it."""
    with LiveServer(server_config(llama.model_dir, tmp_path_factory.mktemp("strict-store"), max_lora_rank=8)) as live:
        yield live


def store_contents(server: LiveServer) -> list[str]:
    root = server.config.adapters
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def assert_refused_leaving_nothing(server: LiveServer, request: dict, status: int, word: str) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        listed, stored = http.get("/v1/adapters").json(), store_contents(server)
        error = assert_openai_error(http.post("/v1/adapters", **request), status)
        assert word in error["message"]
        assert http.get("/v1/adapters").json() == listed
    assert store_contents(server) == stored


@pytest.mark.parametrize("make_request, status, word", BAD_UPLOADS)
def test_a_bad_upload_is_refused_naming_the_problem_and_stores_nothing(strict_server, llama, tmp_path, make_request, status, word):
    assert_refused_leaving_nothing(strict_server, make_request(llama, tmp_path), status, word)


@pytest.fixture(scope="module")
def small_server(llama, tmp_path_factory):
    """A server that takes adapters of at most 1000 bytes."""
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("small-store"))
    with LiveServer(config.model_copy(update={"max_adapter_bytes": 1000})) as live:
        yield live


def just_over_the_limit(llama) -> dict:
    return form("over", *valid(llama))  # a valid adapter of some 7 kB


def far_over_the_limit(llama) -> dict:
    return form("far-over", valid(llama)[0], bytes(8 << 20))  # refused before the body is read


@pytest.mark.parametrize("make_request", [just_over_the_limit, far_over_the_limit], ids=lambda f: f.__name__)
def test_an_upload_over_max_adapter_bytes_is_refused_with_413(small_server, llama, make_request):
    assert_refused_leaving_nothing(small_server, make_request(llama), 413, "max-adapter-bytes")


# ----- vLLM's load_lora_adapter / unload_lora_adapter ----------------------------------------


def load(http: httpx.Client, name: str, path: Path | str) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def test_load_lora_adapter_serves_a_peft_directory_inside_the_allowed_roots(http, client, oracle, tokenizer, llama, lora_root):
    path = shutil.copytree(llama.adapter_dirs["r8-attn"], lora_root / "r8-attn")
    assert load(http, "vllm-loaded", path).status_code == 200
    assert_same_output(served(client, "vllm-loaded"), expected(oracle, tokenizer, "r8-attn"))


def outside(llama, lora_root: Path) -> Path:
    return llama.adapter_dirs["r4-qv"]


def symlink_to_outside(llama, lora_root: Path) -> Path:
    link = lora_root / "link-out"
    link.symlink_to(llama.adapter_dirs["r4-qv"], target_is_directory=True)
    return link


def dotdot_to_outside(llama, lora_root: Path) -> Path:
    up_to_filesystem_root = [".."] * (len(lora_root.parts) - 1)
    return Path(lora_root, *up_to_filesystem_root, *llama.adapter_dirs["r4-qv"].parts[1:])


def registrations(http: httpx.Client, source: str) -> float:
    """`loraplex_adapter_register_seconds_count{source=...}` from the live server's /metrics."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "loraplex_adapter_register_seconds_count" and sample.labels == {"source": source}:
                return sample.value
    raise KeyError(source)


@pytest.mark.parametrize("source", ["upload", "path"])
def test_each_registration_is_timed_under_its_source(http, llama, lora_root, source):
    before = {name: registrations(http, name) for name in ("store", "upload", "path")}
    if source == "upload":
        assert upload(http, "timed-upload", llama.adapter_dirs["r4-qv"]).status_code == 201
    else:
        path = shutil.copytree(llama.adapter_dirs["r4-qv"], lora_root / "timed-path")
        assert load(http, "timed-path", path).status_code == 200
    after = {name: registrations(http, name) for name in ("store", "upload", "path")}
    assert {name: after[name] - before[name] for name in after} == {
        name: float(name == source) for name in ("store", "upload", "path")
    }


@pytest.mark.parametrize("where", [outside, symlink_to_outside, dotdot_to_outside], ids=lambda f: f.__name__)
def test_load_lora_adapter_refuses_a_path_outside_the_allowed_roots_with_403(http, llama, lora_root, where):
    name = f"escape-{where.__name__}"
    assert_openai_error(load(http, name, where(llama, lora_root)), 403)
    assert name not in [entry["id"] for entry in http.get("/v1/models").json()["data"]]


def test_unload_lora_adapter_stops_serving_it(http, client, llama, lora_root):
    path = shutil.copytree(llama.adapter_dirs["r4-qv"], lora_root / "unloaded")
    assert load(http, "vllm-unloaded", path).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "vllm-unloaded"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        served(client, "vllm-unloaded")


# ----- persistence ---------------------------------------------------------------------------


def test_uploaded_adapters_survive_a_restart_with_their_owner_created_and_outputs(llama, tmp_path):
    config = server_config(llama.model_dir, tmp_path / "store")
    with LiveServer(config) as first, httpx.Client(base_url=first.url, timeout=60) as http:
        upload(http, "kept-a", llama.adapter_dirs["r4-qv"])
        upload(http, "kept-b", llama.adapter_dirs["r8-all-rslora"])
        client = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
        listed = http.get("/v1/adapters").json()
        outputs = [served(client, "kept-a"), served(client, "kept-b")]
    with LiveServer(config) as second, httpx.Client(base_url=second.url, timeout=60) as http:
        client = openai.OpenAI(base_url=second.url + "/v1", api_key="unused", max_retries=0)
        assert http.get("/v1/adapters").json() == listed
        for name, before in zip(("kept-a", "kept-b"), outputs):
            assert_same_output(served(client, name), before)

"""The OpenAPI document tells the truth: its shape, then schemathesis holding a live server to it.

One live server (keys file, `--metrics-auth key`, a small context and queue, one uploaded adapter)
serves the module. The first tests read its `/openapi.json`: every route lists the statuses it
really answers, in OpenAI's error shape, with true content types; the upload body is multipart;
security is declared only when there are keys; this server's limits bound the request schemas.
The `fuzz` tests then let schemathesis generate requests from the document, valid and invalid,
one operation at a time and in linked sequences, with every check on: no 500, every response as
documented, every valid request accepted, every invalid one refused, keys enforced.
Deselect them with `-m "not fuzz"`.
"""

import dataclasses

import httpx
import jsonschema
import pytest
import schemathesis
from schemathesis.engine import StopReason
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
)

from live_server import LiveServer, server_config, upload
from loraplex.api.adapters import FORM_FIELDS
from loraplex.api.app import create_app
from loraplex.api.auth import ApiKeys
from loraplex.api.gate import needs_key
from loraplex.service.store import NAME_PATTERN
from schemathesis_run import ServerRules, run_schemathesis
from tiny import make_adapter, make_model, make_tokenizer

BASE = "tiny-base"
ADAPTER = "fuzz-adapter"
ADMIN, TENANT, METRICS = "sk-admin-4c1f0e9a", "sk-acme-7b2d5e13", "sk-metrics-9e8a6c21"
KEYS_FILE = f"""
[[keys]]
key = "{ADMIN}"
tenant = "operators"
role = "admin"

[[keys]]
key = "{TENANT}"
tenant = "acme"
role = "tenant"

[[keys]]
key = "{METRICS}"
tenant = "prometheus"
role = "metrics"
"""
MAX_MODEL_LEN = 32  # small, so every generated request is cheap to serve on a CPU
MAX_QUEUE = 64
FUZZ_SEED = 20250101
FUZZ_EXAMPLES = 100  # generated requests per operation in the fuzzing phase, and stateful scenarios
FUZZ_STEPS = 8  # calls per stateful scenario
FUZZ_DEADLINE = 480  # seconds for the whole run (pytest-timeout); schemathesis's max-time would fill it, not bound it

V1_GATE = {400, 401, 403, 413, 500, 503}  # what every /v1 request can meet before and after its route
STATUSES = {
    ("post", "/v1/completions"): {200, 404, 429} | V1_GATE,
    ("post", "/v1/chat/completions"): {200, 404, 429} | V1_GATE,
    ("get", "/v1/models"): {200} | V1_GATE,
    ("get", "/v1/models/{model_id}"): {200, 404} | V1_GATE,
    ("get", "/v1/adapters"): {200} | V1_GATE,
    ("post", "/v1/adapters"): {200, 201, 409, 422} | V1_GATE,
    ("post", "/v1/adapters/merge"): {200, 201, 404, 409, 422} | V1_GATE,
    ("get", "/v1/adapters/{name}"): {200, 404} | V1_GATE,
    ("delete", "/v1/adapters/{name}"): {200, 404} | V1_GATE,
    ("post", "/v1/load_lora_adapter"): {200, 404, 422} | V1_GATE,
    ("post", "/v1/unload_lora_adapter"): {200, 404} | V1_GATE,
    ("post", "/tokenize"): {200, 404} | V1_GATE,  # vLLM's, outside /v1, behind the same keys
    ("post", "/detokenize"): {200, 404} | V1_GATE,
    ("get", "/tokenizer_info"): {200} | V1_GATE,
    ("get", "/health"): {200, 400, 413, 500, 503},
    ("get", "/version"): {200, 400, 413, 500},
    ("get", "/metrics"): {200, 400, 401, 403, 413, 500},
}
ADAPTER_MUST_FIT = {("post", "/v1/adapters"), ("post", "/v1/adapters/merge"), ("post", "/v1/load_lora_adapter")}


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    """A tiny checkpoint whose embedding covers its whole tokenizer, and one adapter for it.

    The shared fixtures' tiny models have 256 embedding rows for a 259-token tokenizer, so some
    text would tokenize to ids the model cannot take; here every text the schema allows can be served.
    """
    root = tmp_path_factory.mktemp("fuzz-model")
    vocab = len(make_tokenizer(root / "tokenizer"))
    model_dir = make_model(root / "base", "llama", seed=7, vocab_size=vocab)
    return model_dir, make_adapter(model_dir, root / "adapter", rank=4, seed=7)


@pytest.fixture(scope="module")
def server(fuzz_model, tmp_path_factory):
    model_dir, adapter_dir = fuzz_model
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS_FILE)
    config = server_config(
        model_dir, tmp_path_factory.mktemp("store"), api_keys=keys, max_model_len=MAX_MODEL_LEN, max_queue=MAX_QUEUE
    )
    config = config.model_copy(update={"metrics_auth": "key", "lora_roots": (tmp_path_factory.mktemp("lora-root"),)})
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def uploaded(server, fuzz_model) -> dict:
    """The adapter in the store when schemathesis starts: its record, as the upload answered it."""
    with admin_client(server) as client:
        response = upload(client, ADAPTER, fuzz_model[1])
    assert response.status_code == 201, response.text
    return response.json()


def admin_client(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = httpx.get(server.url + "/openapi.json", timeout=60)
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def open_document(server) -> dict:
    """The document of the same server without keys (only the app is built; nothing is served)."""
    config = server.config.model_copy(update={"api_keys": None, "metrics_auth": "open"})
    return create_app(dataclasses.replace(server.services, config=config, keys=ApiKeys.open())).openapi()


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def component(document: dict, name: str) -> dict:
    return document["components"]["schemas"][name]


def resolved(document: dict, schema: dict) -> dict:
    """`schema` with `components` beside it, so a validator can follow its `$ref`s."""
    return {**schema, "components": document["components"]}


# ----- the document's shape --------------------------------------------------------------------


def test_every_operation_lists_the_statuses_it_can_answer(document):
    listed = {(method, path): {int(status) for status in operation["responses"]} for method, path, operation in operations(document)}
    assert listed == STATUSES


def test_only_routes_that_validate_an_adapter_document_a_422(document):
    with_422 = {(method, path) for method, path, operation in operations(document) if "422" in operation["responses"]}
    assert with_422 == ADAPTER_MUST_FIT
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])


def test_every_error_answers_the_openai_error_body(document):
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400 or (path, status) == ("/health", "503"):
                continue
            assert response["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
            assert response["description"], (method, path, status)
    error = component(document, "ErrorDetail")
    assert set(error["required"]) == {"message", "type", "param", "code"}


def test_429_and_503_carry_retry_after(document):
    for method, path, operation in operations(document):
        for status in ("429", "503"):
            if status in operation["responses"] and path != "/health":
                header = operation["responses"][status]["headers"]["Retry-After"]
                assert header["required"] and header["schema"]["type"] == "integer", (method, path)


def test_generation_answers_json_or_an_event_stream(document):
    for path, answer, chunk in [
        ("/v1/completions", "Completion", "CompletionChunk"),
        ("/v1/chat/completions", "ChatCompletion", "ChatCompletionChunk"),
    ]:
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
        event = content["text/event-stream"]["itemSchema"]
        payload = event["properties"]["data"]["anyOf"][1]["contentSchema"]
        assert {"$ref": f"#/components/schemas/{chunk}"} in payload["anyOf"]


@pytest.mark.parametrize(
    "method, path, media_type",
    [
        ("get", "/metrics", "text/plain"),
        ("post", "/v1/load_lora_adapter", "text/plain"),
        ("post", "/v1/unload_lora_adapter", "text/plain"),
        ("get", "/health", "application/json"),
    ],
)
def test_plain_routes_document_their_true_content_type(document, method, path, media_type):
    assert set(document["paths"][path][method]["responses"]["200"]["content"]) == {media_type}


def test_metrics_is_described_as_prometheus_text(document):
    assert "Prometheus text exposition" in document["paths"]["/metrics"]["get"]["responses"]["200"]["description"]


def test_the_upload_body_is_multipart_with_the_fields_the_route_reads(document):
    body = document["paths"]["/v1/adapters"]["post"]["requestBody"]
    assert body["required"] and set(body["content"]) == {"multipart/form-data"}
    form = body["content"]["multipart/form-data"]
    schema = form["schema"]
    assert set(schema["properties"]) == FORM_FIELDS
    assert set(schema["required"]) == {"name", "config", "weights"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["name"]["pattern"] == NAME_PATTERN.pattern == "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    assert schema["properties"]["weights"]["format"] == "binary"
    assert form["encoding"]["config"]["contentType"] == "application/json"


def test_with_keys_every_v1_route_the_tokenizer_routes_and_metrics_need_a_bearer_key(document):
    assert {"/tokenize", "/detokenize", "/tokenizer_info"} <= {path for _, path, _ in operations(document) if needs_key(path)}
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in operations(document):
        expected = [{"bearerAuth": []}] if needs_key(path) or path == "/metrics" else None
        assert operation.get("security") == expected, (method, path)


def test_without_keys_no_security_and_no_401_is_declared(open_document):
    assert "securitySchemes" not in open_document["components"]
    for method, path, operation in operations(open_document):
        assert "security" not in operation, (method, path)
        assert "401" not in operation["responses"], (method, path)


def test_this_servers_limits_bound_the_request_schemas(document, server):
    vocab = server.engine.base.model.config.vocab_size
    completion = component(document, "CompletionRequest")["properties"]
    chat = component(document, "ChatCompletionRequest")["properties"]
    prompt_ids = next(b for b in completion["prompt"]["anyOf"] if b.get("items", {}).get("type") == "integer")
    assert prompt_ids["items"]["maximum"] == vocab - 1
    assert prompt_ids["maxItems"] == MAX_MODEL_LEN - 1
    prompt_text = next(b for b in completion["prompt"]["anyOf"] if b.get("type") == "string")
    assert prompt_text["maxLength"] == server.services.prompts.max_chars
    for request, field in [(completion, "max_tokens"), (chat, "max_tokens"), (chat, "max_completion_tokens")]:
        assert request[field]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1
    assert completion["n"]["maximum"] == chat["n"]["maximum"] == 16  # below the queue (64)


def test_integer_bounds_are_exact_not_rounded_to_floats(document):
    seed = component(document, "CompletionRequest")["properties"]["seed"]["anyOf"][0]
    assert seed["maximum"] == (1 << 63) - 1 and isinstance(seed["maximum"], int)


def test_the_document_is_built_once_per_app(server):
    app = create_app(server.services)
    assert app.openapi() is app.openapi()


def test_a_real_upload_answers_the_documented_adapter_record(document, uploaded):
    jsonschema.validate(uploaded, resolved(document, component(document, "AdapterRecord")))


@pytest.mark.parametrize(
    "key, path, status",
    [
        (None, "/v1/models", 401),
        (METRICS, "/v1/models", 403),
        (None, "/metrics", 401),
        (TENANT, "/metrics", 403),
    ],
    ids=["no-key-v1", "metrics-key-v1", "no-key-metrics", "tenant-key-metrics"],
)
def test_the_gates_refusals_answer_as_documented(document, server, key, path, status):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = httpx.get(server.url + path, headers=headers, timeout=60)
    assert response.status_code == status
    documented = document["paths"][path]["get"]["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.validate(response.json(), resolved(document, documented))


@pytest.mark.parametrize(
    "method, path, allow",
    [("PUT", "/v1/adapters", "GET, POST"), ("PATCH", "/v1/adapters/some-name", "GET, DELETE"), ("POST", "/health", "GET")],
)
def test_a_405_allows_every_method_the_path_serves_not_only_the_first_routes(server, method, path, allow):
    with admin_client(server) as client:
        response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow


# ----- schemathesis --------------------------------------------------------------------------


def fuzz_config() -> schemathesis.Config:
    # Statuses valid data may get besides schemathesis's defaults (2xx, 401, 403, 404, 409, 429, 5xx):
    defaults = ["2xx", "401", "403", "404", "409", "429", "5xx"]
    return schemathesis.Config.from_dict(
        {
            "seed": FUZZ_SEED,
            "suppress-health-check": ["too_slow"],
            "generation": {"mode": "all", "deterministic": True, "database": "none", "max-examples": FUZZ_EXAMPLES},
            "phases": {"stateful": {"enabled": True, "max-steps": FUZZ_STEPS}},
            "auth": {"openapi": {"bearerAuth": {"bearer": ADMIN}}},
            "request-timeout": 60,
            # Reports show max_tokens and top_logprobs ("token" is a secret marker by default); keys stay hidden.
            "output": {"sanitization": {"keys-to-sanitize": ["authorization"], "sensitive-markers": ["authorization"]}},
            "operations": [
                {
                    # An upload's files are validated beyond any schema (the safetensors header,
                    # tensor names and shapes against the base, the config's fields, and a chat
                    # template by rendering it): generated files are a 400 (unreadable) or a 422.
                    "include-path": "/v1/adapters",
                    "include-method": "POST",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*defaults, "400", "422"]}},
                },
                {
                    # Whether adapters can be merged depends on their contents (targets, layers,
                    # ranks; an svd rank within the merged modules' sides): a 400 or 422 says why not.
                    "include-path": "/v1/adapters/merge",
                    "include-method": "POST",
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": [*defaults, "400", "422"]},
                        # /v1/adapters/merge is also /v1/adapters/{name} for an adapter named
                        # "merge", so the server rightly allows GET and DELETE there too; the
                        # check reads only the literal path's operations. (Reported: the paths collide.)
                        "allow_header_conformance": {"enabled": False},
                    },
                },
                {
                    # Unloading an adapter that lives in the store is a 400 (delete it instead):
                    # where a name came from is server state, not request shape.
                    "include-path": "/v1/unload_lora_adapter",
                    "include-method": "POST",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*defaults, "400"]}},
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def api_schema(server, fuzz_model, uploaded):
    """The served document, with the store holding `uploaded`, and `ServerRules` as a hook."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=fuzz_config())
    rules = ServerRules(server, BASE, adapter_dir=fuzz_model[1])

    @schema.hook
    def map_case(context, case):
        return rules(case)

    return schema


def test_the_fuzz_runs_every_check(api_schema):
    config = api_schema.config.checks_config_for()
    for check in (positive_data_acceptance, negative_data_rejection, ignored_auth, response_schema_conformance):
        assert getattr(config, check.__name__).enabled


@pytest.mark.fuzz
@pytest.mark.timeout(FUZZ_DEADLINE)
def test_schemathesis_finds_nothing_the_document_does_not_promise(api_schema):
    report = run_schemathesis(api_schema)
    print(f"schemathesis: {report.seconds:.0f} s, {sum(report.responses.values())} responses, {report.links} links")
    for (method, path, status), count in sorted(report.responses.items()):
        print(f"  {method} {path} {status}: {count}")
    assert not report.problems, "\n\n".join(report.problems)
    assert report.stop_reason == StopReason.COMPLETED
    assert report.links > 0, "the stateful phase found no links between operations to follow"
    served = {(method, path) for method, path, status in report.responses if status < 300}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters/merge")} <= served

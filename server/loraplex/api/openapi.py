"""The OpenAPI document: what `/openapi.json` says this server accepts and answers.

Owns: `install_openapi`, which replaces FastAPI's `app.openapi` with one that builds the document
once per app and caches it. On top of what the routes declare (their bodies, and the statuses
their handlers answer, with response_models.py's shapes) it adds what a request meets before any
route runs (the gate's 400, 401, 403 and 413, the drain's 503, the last resort's 500), the bearer
scheme when the server has API keys, the upload's multipart body, request examples naming the
served model, and the request rules of openapi_requests.py, with this server's own limits, so
that what the schema accepts, the server accepts. Component schemas come from pydantic itself.
FastAPI's automatic 422 entries go: request validation errors are 400s here. It must not change
what any route accepts or answers.
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic.json_schema import models_json_schema

from loraplex.api.gate import FORM_OVERHEAD, UPLOAD_PATH, needs_key
from loraplex.api.openapi_requests import bound_requests, upload_form
from loraplex.api.response_models import DOCUMENTED, SCHEMA_REF, error
from loraplex.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraRequest,
    MergeRequest,
    TokenizeRequest,
    UnloadLoraRequest,
)
from loraplex.api.served_facts import ServedFacts
from loraplex.api.services import Services

REQUEST_MODELS = (
    CompletionRequest, ChatCompletionRequest, MergeRequest, LoadLoraRequest, UnloadLoraRequest, TokenizeRequest,
    DetokenizeRequest,
)  # fmt: skip
BEARER = "bearerAuth"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def install_openapi(app: FastAPI, svc: Services) -> None:
    """Serve `build_document` of `svc`'s facts as the app's OpenAPI document, built on first use and cached."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, ServedFacts.of(svc))
        return app.openapi_schema

    app.openapi = openapi


def build_document(app: FastAPI, facts: ServedFacts) -> dict:
    document = get_openapi(
        title=app.title, version=app.version, summary=app.summary, description=_description(facts), routes=app.routes
    )
    document["components"] = {"schemas": _components()}
    bound_requests(document["components"]["schemas"], facts)
    for path, method, operation in _operations(document):
        _drop_validation_422(operation)
        _add_gate_responses(path, operation, facts)
        if _needs_key(path, facts):
            operation["security"] = [{BEARER: []}]
        operation["responses"] = dict(sorted(operation["responses"].items()))
    if facts.api_keys:
        document["components"]["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key from the server's keys file (--api-keys): `Authorization: Bearer <key>`.",
            }
        }
    _add_bodies_and_examples(document, facts)
    _check_references(document)
    return document


def _description(facts: ServedFacts) -> str:
    auth = (
        "Every /v1 route (and vLLM's /tokenize, /detokenize and /tokenizer_info) needs `Authorization: Bearer <key>`"
        + (", and so does /metrics" if facts.protect_metrics else "")
        + "; a tenant key sees its own and the shared adapters, an admin key all of them."
        if facts.api_keys
        else "This server has no API keys: every caller is the default tenant, with admin rights."
    )
    return (
        f"Serves `{facts.model_name}` (max_model_len {facts.max_model_len}) and its LoRA adapters. "
        f"{auth} Every error answers OpenAI's error shape (`ErrorBody`); request validation errors are 400s "
        "naming the field, never 422 (422 means an adapter that does not fit the base model). "
        "429 and 503 carry `Retry-After`."
    )


def _components() -> dict:
    """Every schema, straight from pydantic (FastAPI's copy turns integer bounds into floats, 2**63-1 into 2**63)."""
    inputs = [(model, "validation") for model in REQUEST_MODELS]
    outputs = [(model, "serialization") for model in DOCUMENTED]
    _, schemas = models_json_schema(inputs + outputs, ref_template=SCHEMA_REF)
    return dict(sorted(schemas["$defs"].items()))


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _drop_validation_422(operation: dict) -> None:
    """FastAPI's automatic 422 (its HTTPValidationError); a 422 a route declares itself stays."""
    entry = operation["responses"].get("422")
    schema = (entry or {}).get("content", {}).get("application/json", {}).get("schema", {})
    if schema.get("$ref", "").endswith("/HTTPValidationError"):
        del operation["responses"]["422"]


def _needs_key(path: str, facts: ServedFacts) -> bool:
    if not facts.api_keys:
        return False
    return needs_key(path) or (path == "/metrics" and facts.protect_metrics)


def _add_gate_responses(path: str, operation: dict, facts: ServedFacts) -> None:
    """The statuses every request can meet before (or after) its route: gate, drain, last resort."""
    limit = facts.max_adapter_bytes + FORM_OVERHEAD if path == UPLOAD_PATH else facts.max_request_bytes
    flag = "--max-adapter-bytes plus 1 MiB for the form" if path == UPLOAD_PATH else "--max-request-bytes"
    gate = {
        400: "More than one Authorization header.",
        413: f"The body is over {limit} bytes ({flag}); refused before it is read.",
        500: "The engine failed on this request alone, or an unexpected error; never for bad input.",
    }
    if _needs_key(path, facts):
        gate[401] = "No API key, or one the server does not know."
        gate[403] = (
            "The key may not read /metrics (it needs an admin or metrics key)."
            if path == "/metrics"
            else "A metrics-only key, which may only read /metrics."
        )
    if needs_key(path):  # the routes behind the gate's keys are the ones a drain refuses
        gate[503] = "The server is draining (shutting down); retry on another replica."
    responses = operation["responses"]
    for status, description in gate.items():
        key = str(status)
        if key in responses:
            responses[key]["description"] = f"{responses[key]['description']} Or: {description}"
        else:
            responses[key] = error(status, description)


def _add_bodies_and_examples(document: dict, facts: ServedFacts) -> None:
    paths = document["paths"]
    paths[UPLOAD_PATH]["post"]["requestBody"] = upload_form(facts)
    paths["/metrics"]["get"]["responses"]["200"]["description"] = (
        f"The Prometheus text exposition, sent as `{CONTENT_TYPE_LATEST}`."
    )
    bodies = {
        "/v1/completions": {"model": facts.model_name, "prompt": "Hello", "max_tokens": 4},
        "/v1/chat/completions": {
            "model": facts.model_name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
        },
    }
    for path, body in bodies.items():
        content = paths[path]["post"]["requestBody"]["content"]["application/json"]
        content["examples"] = {
            "plain": {"summary": "One answer, as JSON", "value": body},
            "streamed": {"summary": "Server-sent events", "value": {**body, "stream": True}},
        }


def _check_references(document: dict) -> None:
    """Every `$ref` names a component: a missing one is a bug in this module, found at the first build."""
    schemas = document["components"]["schemas"]
    stack = [document["paths"], schemas]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.removeprefix("#/components/schemas/") not in schemas:
                raise RuntimeError(f"the OpenAPI document refers to a schema it does not define: {ref}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)

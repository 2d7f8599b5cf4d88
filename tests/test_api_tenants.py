"""API keys and tenancy over HTTP: who may see, use and change which adapters.

Two tenants ("acme", "globex") and one admin call one real server (tests/live_server.py). A
tenant sees its own adapters and the shared ones; another tenant's adapter is reported missing
exactly as a name nobody uploaded is; admins see and manage everything. Management goes through
httpx, generation through the official `openai` SDK. Tenant weights in the keys file are checked
on `ApiKeys.load` alone, without a server.
"""

import json
import shutil

import httpx
import openai
import pytest

from live_server import LiveServer, server_config, upload
from loraplex.api.app import create_app
from loraplex.api.auth import ApiKeys

BASE = "tiny-base"
PROMPT = [17, 42, 99, 5, 130, 64]
MAX_TOKENS = 8
ACME, GLOBEX, ADMIN = "sk-acme-0f3c9a71", "sk-globex-5b2e8d40", "sk-admin-9d41c6e2"
UNKNOWN = "sk-nobody-7e1a2b3c"
TENANT_KEYS = [pytest.param(ACME, id="acme"), pytest.param(GLOBEX, id="globex")]
ERROR_FIELDS = {"message", "type", "param", "code"}

KEYS_FILE = f"""
[[keys]]
key = "{ACME}"
tenant = "acme"
role = "tenant"

[[keys]]
key = "{GLOBEX}"
tenant = "globex"
role = "tenant"

[[keys]]
key = "{ADMIN}"
tenant = "operators"
role = "admin"
"""


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-root")


@pytest.fixture(scope="module")
def server(llama, lora_root, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS_FILE)
    config = server_config(llama.model_dir, tmp_path_factory.mktemp("store"), api_keys=keys)
    with LiveServer(config.model_copy(update={"lora_roots": (lora_root,)})) as live:
        yield live


def caller(server: LiveServer, key: str | None) -> httpx.Client:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def acme(server):
    with caller(server, ACME) as client:
        yield client


@pytest.fixture(scope="module")
def globex(server):
    with caller(server, GLOBEX) as client:
        yield client


@pytest.fixture(scope="module")
def admin(server):
    with caller(server, ADMIN) as client:
        yield client


def sdk(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def complete(server: LiveServer, key: str, model: str):
    return sdk(server, key).completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )


def chat(server: LiveServer, key: str, model: str):
    return sdk(server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS, temperature=0
    )


def greedy(server: LiveServer, key: str, model: str) -> tuple[str, list[float]]:
    """The greedy text and chosen-token logprobs `key` gets from `model`."""
    choice = complete(server, key, model).choices[0]
    return choice.text, choice.logprobs.token_logprobs


def names(client: httpx.Client, route: str) -> list[str]:
    """The names a caller is shown by /v1/models or /v1/adapters."""
    field = "id" if route == "/v1/models" else "name"
    return [entry[field] for entry in client.get(route).json()["data"]]


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS
    return body["error"]


@pytest.fixture(scope="module")
def a_adapter(acme, llama) -> dict:
    """acme's private adapter."""
    response = upload(acme, "a-adapter", llama.adapter_dirs["r4-qv"])
    assert response.status_code == 201
    return response.json()


@pytest.fixture(scope="module")
def shared_adapter(admin, llama) -> dict:
    response = upload(admin, "shared-adapter", llama.adapter_dirs["r8-attn"], shared=True)
    assert response.status_code == 201
    return response.json()


# ----- keys --------------------------------------------------------------------------------

V1_ROUTES = [
    # (method, path, request fields); {name} is acme's adapter
    ("GET", "/v1/models", {}),
    ("GET", "/v1/models/{model_id}", {}),
    ("GET", "/v1/adapters", {}),
    ("GET", "/v1/adapters/{name}", {}),
    ("DELETE", "/v1/adapters/{name}", {}),
    ("POST", "/v1/adapters", {"files": {"config": ("adapter_config.json", b"{}")}, "data": {"name": "anon"}}),
    ("POST", "/v1/adapters/merge", {"json": {"name": "anon", "adapters": ["{name}", "{name}"], "weights": [1, 1], "method": "cat"}}),
    ("POST", "/v1/completions", {"json": {"model": BASE, "prompt": PROMPT, "max_tokens": 1}}),
    ("POST", "/v1/chat/completions", {"json": {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}}),
    ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "anon", "lora_path": "/nowhere"}}),
    ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "anon"}}),
]
ROUTE_CASES = [pytest.param(method, path, request, id=f"{method} {path}") for method, path, request in V1_ROUTES]


def test_the_route_table_covers_every_v1_route(server):
    paths = create_app(server.services).openapi()["paths"]
    routes = {(method.upper(), path) for path, operations in paths.items() if path.startswith("/v1") for method in operations}
    assert routes == {(method, path) for method, path, _ in V1_ROUTES}


@pytest.mark.parametrize("key", [None, UNKNOWN], ids=["no-key", "unknown-key"])
@pytest.mark.parametrize("method, path, request_fields", ROUTE_CASES)
def test_every_v1_route_refuses_a_missing_or_unknown_key_with_401(server, a_adapter, key, method, path, request_fields):
    with caller(server, key) as client:
        response = client.request(method, path.format(name="a-adapter", model_id="a-adapter"), **request_fields)
    error = assert_openai_error(response, 401)
    assert error["type"] == "authentication_error"


@pytest.mark.parametrize("authorization", ["Bearer {key}", "bearer  {key}", "Basic {key}", "{key}", "Bearer {key}x"])
@pytest.mark.parametrize("method, path, request_fields", ROUTE_CASES)
def test_a_401_never_echoes_the_key_sent(server, authorization, method, path, request_fields):
    headers = {"Authorization": authorization.format(key=UNKNOWN)}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        response = client.request(method, path.format(name="a-adapter", model_id="a-adapter"), **request_fields)
    assert response.status_code == 401
    assert UNKNOWN not in response.text
    assert all(UNKNOWN not in value for value in response.headers.values())


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_health_and_metrics_need_no_key(server, path):
    with caller(server, None) as client:
        assert client.get(path).status_code == 200


# ----- tenant weights in the keys file ----------------------------------------------------------


def keys_entry(key: str, tenant: str, weight: str | None = None) -> str:
    """One [[keys]] table; `weight` is written as TOML source, e.g. `2.5` or `"2"`."""
    line = "" if weight is None else f"weight = {weight}\n"
    return f'[[keys]]\nkey = "{key}"\ntenant = "{tenant}"\nrole = "tenant"\n{line}'


def load_keys(tmp_path, *entries: str) -> ApiKeys:
    path = tmp_path / "keys.toml"
    path.write_text("\n".join(entries))
    return ApiKeys.load(path)


def test_a_keys_entry_gives_its_tenant_a_weight(tmp_path):
    keys = load_keys(tmp_path, keys_entry(ACME, "acme", "2.5"), keys_entry(GLOBEX, "globex", "3"))
    assert keys.tenant_weights() == {"acme": 2.5, "globex": 3.0}
    assert keys.authenticate(f"Bearer {ACME}").weight == 2.5


@pytest.mark.parametrize("weight, expected", [("0.001", 0.001), ("1000", 1000.0), ("7", 7.0)])
def test_a_weight_may_be_any_number_above_0_up_to_1000(tmp_path, weight, expected):
    assert load_keys(tmp_path, keys_entry(ACME, "acme", weight)).tenant_weights() == {"acme": expected}


def test_a_tenant_without_a_weight_weighs_one(tmp_path):
    keys = load_keys(tmp_path, KEYS_FILE)
    assert keys.tenant_weights() == {"acme": 1.0, "globex": 1.0, "operators": 1.0}
    assert keys.authenticate(f"Bearer {GLOBEX}").weight == 1.0


def test_an_open_server_has_no_tenant_weights():
    assert ApiKeys.open().tenant_weights() == {}


@pytest.mark.parametrize("weight", ["0", "-1", "0.0", "1000.5", "inf", "nan", '"2"', "true", "[1]"])
def test_a_weight_that_is_not_a_number_in_0_to_1000_is_refused_naming_the_entry(tmp_path, weight):
    with pytest.raises(ValueError, match=r"\[\[keys\]\] entry 2: weight must be a number > 0 and <= 1000"):
        load_keys(tmp_path, keys_entry(ACME, "acme"), keys_entry(GLOBEX, "globex", weight))


@pytest.mark.parametrize("first, second", [("2", "3"), (None, "2"), ("2", None)], ids=["different", "default-then-2", "2-then-default"])
def test_two_keys_giving_one_tenant_different_weights_are_refused_naming_the_tenant(tmp_path, first, second):
    with pytest.raises(ValueError, match="entry 2 gives tenant 'acme' weight"):
        load_keys(tmp_path, keys_entry(ACME, "acme", first), keys_entry(GLOBEX, "acme", second))


def test_keys_of_one_tenant_may_repeat_its_weight(tmp_path):
    keys = load_keys(tmp_path, keys_entry(ACME, "acme", "4"), keys_entry(GLOBEX, "acme", "4.0"))
    assert keys.tenant_weights() == {"acme": 4.0}


# ----- another tenant's adapter --------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/models", "/v1/adapters"])
def test_another_tenants_adapter_is_not_listed(globex, a_adapter, route):
    assert "a-adapter" not in names(globex, route)


# What globex may try on a name; each returns the response.


def show(server, name):
    with caller(server, GLOBEX) as client:
        return client.get(f"/v1/adapters/{name}")


def delete(server, name):
    with caller(server, GLOBEX) as client:
        return client.delete(f"/v1/adapters/{name}")


def use_completions(server, name):
    with pytest.raises(openai.APIStatusError) as error:
        complete(server, GLOBEX, name)
    return error.value.response


def use_chat(server, name):
    with pytest.raises(openai.APIStatusError) as error:
        chat(server, GLOBEX, name)
    return error.value.response


@pytest.mark.parametrize("attempt", [show, delete, use_completions, use_chat], ids=lambda f: f.__name__)
def test_another_tenants_adapter_is_missing_exactly_like_a_nonexistent_one(server, acme, a_adapter, attempt):
    missing = attempt(server, "no-such-adapter")
    taken = attempt(server, "a-adapter")
    assert_openai_error(missing, 404)
    assert taken.status_code == missing.status_code
    assert json.loads(taken.text.replace("a-adapter", "no-such-adapter")) == missing.json()
    assert acme.get("/v1/adapters/a-adapter").json() == a_adapter


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_tenant_cannot_take_a_name_another_tenant_holds(server, acme, globex, a_adapter, llama, overwrite):
    before = greedy(server, ACME, "a-adapter")
    assert_openai_error(upload(globex, "a-adapter", llama.adapter_dirs["r8-attn"], overwrite=overwrite), 409)
    shown = acme.get("/v1/adapters/a-adapter").json()
    assert {**shown, "tier": None} == {**a_adapter, "tier": None}  # the tier moves as requests come and go
    assert greedy(server, ACME, "a-adapter") == before


# ----- a tenant's own adapters ----------------------------------------------------------------


def test_a_tenant_lists_its_own_adapters(acme, llama):
    record = upload(acme, "acme-listed", llama.adapter_dirs["r4-qv"]).json()
    assert record["owner"] == "acme"
    assert record in acme.get("/v1/adapters").json()["data"]
    assert "acme-listed" in names(acme, "/v1/models")


def test_a_tenant_uses_its_own_adapter(server, acme, llama):
    assert upload(acme, "acme-used", llama.adapter_dirs["r8-attn"]).status_code == 201
    assert greedy(server, ACME, "acme-used") != greedy(server, ACME, BASE)
    assert chat(server, ACME, "acme-used").usage.completion_tokens == MAX_TOKENS


def test_a_tenant_replaces_its_own_adapter(server, acme, llama):
    upload(acme, "acme-replaced", llama.adapter_dirs["r4-qv"])
    before = greedy(server, ACME, "acme-replaced")
    response = upload(acme, "acme-replaced", llama.adapter_dirs["r8-attn"], overwrite=True)
    assert response.status_code == 200
    assert response.json()["owner"] == "acme"
    assert greedy(server, ACME, "acme-replaced") != before


def test_a_tenant_deletes_its_own_adapter(acme, llama):
    upload(acme, "acme-deleted", llama.adapter_dirs["r4-qv"])
    assert acme.delete("/v1/adapters/acme-deleted").status_code == 200
    assert_openai_error(acme.get("/v1/adapters/acme-deleted"), 404)


# ----- admins ----------------------------------------------------------------------------------


def test_an_admin_lists_every_tenants_adapters_with_their_owners(acme, globex, admin, llama):
    upload(acme, "acme-owned", llama.adapter_dirs["r4-qv"])
    upload(globex, "globex-owned", llama.adapter_dirs["r4-qv"])
    owners = {record["name"]: record["owner"] for record in admin.get("/v1/adapters").json()["data"]}
    assert owners["acme-owned"] == "acme" and owners["globex-owned"] == "globex"
    models = {entry["id"]: entry["owned_by"] for entry in admin.get("/v1/models").json()["data"]}
    assert models["acme-owned"] == "acme" and models["globex-owned"] == "globex"


def test_an_admin_deletes_a_tenants_adapter(acme, admin, llama):
    upload(acme, "acme-removed", llama.adapter_dirs["r4-qv"])
    assert admin.delete("/v1/adapters/acme-removed").status_code == 200
    assert_openai_error(acme.get("/v1/adapters/acme-removed"), 404)


@pytest.mark.parametrize("key", [*TENANT_KEYS, pytest.param(ADMIN, id="admin")])
def test_every_caller_may_use_the_base_model(server, key):
    assert complete(server, key, BASE).usage.completion_tokens == MAX_TOKENS
    assert greedy(server, key, BASE) == greedy(server, ADMIN, BASE)


# ----- vLLM's load/unload: admins only ---------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_in_root(lora_root, llama):
    return shutil.copytree(llama.adapter_dirs["r4-qv"], lora_root / "r4-qv")


@pytest.fixture(scope="module")
def path_adapter(admin, adapter_in_root) -> str:
    """An adapter an admin loaded from a path."""
    response = admin.post("/v1/load_lora_adapter", json={"lora_name": "from-path", "lora_path": str(adapter_in_root)})
    assert response.status_code == 200
    return "from-path"


@pytest.mark.parametrize("key", TENANT_KEYS)
def test_a_tenant_may_not_load_an_adapter_from_a_path(server, admin, adapter_in_root, key):
    with caller(server, key) as tenant:
        response = tenant.post("/v1/load_lora_adapter", json={"lora_name": "tenant-path", "lora_path": str(adapter_in_root)})
    assert_openai_error(response, 403)
    assert "tenant-path" not in names(admin, "/v1/adapters")


@pytest.mark.parametrize("key", TENANT_KEYS)
def test_a_tenant_may_not_unload_an_adapter(server, admin, path_adapter, key):
    with caller(server, key) as tenant:
        response = tenant.post("/v1/unload_lora_adapter", json={"lora_name": path_adapter})
    assert_openai_error(response, 403)
    assert path_adapter in names(admin, "/v1/adapters")


def test_an_admin_loads_an_adapter_from_a_path(server, admin, adapter_in_root):
    response = admin.post("/v1/load_lora_adapter", json={"lora_name": "admin-path", "lora_path": str(adapter_in_root)})
    assert response.status_code == 200
    assert greedy(server, ADMIN, "admin-path") != greedy(server, ADMIN, BASE)


def test_an_admin_unloads_an_adapter_loaded_from_a_path(server, admin, adapter_in_root):
    admin.post("/v1/load_lora_adapter", json={"lora_name": "admin-unload", "lora_path": str(adapter_in_root)})
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "admin-unload"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(server, ADMIN, "admin-unload")


# ----- shared adapters ---------------------------------------------------------------------------


def test_a_shared_upload_has_no_owner(shared_adapter):
    assert shared_adapter["shared"] is True and shared_adapter["owner"] is None


@pytest.mark.parametrize("route", ["/v1/models", "/v1/adapters"])
@pytest.mark.parametrize("key", TENANT_KEYS)
def test_a_shared_adapter_is_visible_to_every_tenant(server, shared_adapter, key, route):
    with caller(server, key) as tenant:
        assert "shared-adapter" in names(tenant, route)


@pytest.mark.parametrize("key", TENANT_KEYS)
def test_a_shared_adapter_is_usable_by_every_tenant(server, shared_adapter, key):
    assert greedy(server, key, "shared-adapter") == greedy(server, ADMIN, "shared-adapter")


@pytest.mark.parametrize("key", TENANT_KEYS)
def test_a_tenant_may_not_delete_a_shared_adapter(server, admin, shared_adapter, key):
    with caller(server, key) as tenant:
        assert_openai_error(tenant.delete("/v1/adapters/shared-adapter"), 403)
    assert "shared-adapter" in names(admin, "/v1/adapters")


# ----- no keys file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(llama, tmp_path_factory):
    with LiveServer(server_config(llama.model_dir, tmp_path_factory.mktemp("open-store"))) as live:
        yield live


def test_without_a_keys_file_no_key_is_needed(open_server):
    with caller(open_server, None) as anyone:
        assert anyone.get("/v1/models").status_code == 200
        assert anyone.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 1}).status_code == 200


def test_without_a_keys_file_uploads_belong_to_the_default_tenant(open_server, llama):
    with caller(open_server, None) as anyone:
        assert upload(anyone, "open-upload", llama.adapter_dirs["r4-qv"]).json()["owner"] == "default"

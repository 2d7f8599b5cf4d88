"""Adapter merging over HTTP (`POST /v1/adapters/merge`) and from the shell (`loraplex merge`).

A tenant merges its own adapters; the result is its own and serves through the live server
exactly as PEFT serves the same merged adapter (computed here with `merge_adapters`, saved,
loaded by `PeftModel.from_pretrained`). Tenancy rules and bad merges are refused with the
status and message a user needs.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from live_server import LiveServer, cli_env, server_config, upload
from loraplex.export import module_shapes, tensor_shapes, weight_files
from loraplex.lora.adapter import read_adapter_dir
from loraplex.merging import merge_adapters

PROMPT = [17, 42, 99, 5, 130, 64]
MAX_TOKENS = 8
ACME, GLOBEX, ADMIN = "sk-acme-merge-1", "sk-globex-merge-2", "sk-admin-merge-3"
KEYS_FILE = "\n".join(
    f'[[keys]]\nkey = "{key}"\ntenant = "{tenant}"\nrole = "{role}"\n'
    for key, tenant, role in ((ACME, "acme", "tenant"), (GLOBEX, "globex", "tenant"), (ADMIN, "operators", "admin"))
)
METHODS = [
    ("linear", ["r8-attn", "r8-all-rslora"], {}),
    ("cat", ["r4-qv", "r8-attn"], {}),
    ("svd", ["r4-qv", "r16-mlp"], {"rank": 8}),
    ("ties", ["r8-attn", "r8-all-rslora"], {"density": 0.5}),
    ("dare_linear", ["r8-attn", "r8-all-rslora"], {"density": 0.7, "seed": 3}),
    ("dare_ties", ["r8-attn", "r8-all-rslora"], {"density": 0.7, "seed": 3}),
]


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS_FILE)
    with LiveServer(server_config(llama.model_dir, tmp_path_factory.mktemp("store"), api_keys=keys)) as live:
        with client_for(live, ACME) as acme:
            for name in ("r4-qv", "r8-attn", "r16-mlp", "r8-all-rslora"):
                assert upload(acme, name, llama.adapter_dirs[name]).status_code == 201
        with client_for(live, GLOBEX) as globex:
            assert upload(globex, "globex-own", llama.adapter_dirs["r4-qv"]).status_code == 201
        with client_for(live, ADMIN) as admin:
            assert upload(admin, "shared-one", llama.adapter_dirs["r8-attn"], shared=True).status_code == 201
        yield live


def client_for(server: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def peft_greedy(llama, adapter_dir: Path) -> list[int]:
    base = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("method, sources, options", METHODS, ids=[m for m, _, _ in METHODS])
def test_a_tenants_merged_adapter_is_its_own_and_serves_like_peft(server, llama, tokenizer, tmp_path, method, sources, options):
    name = f"acme-{method.replace('_', '-')}"
    weights = [0.7, 0.5]
    with client_for(server, ACME) as acme:
        body = {"name": name, "adapters": sources, "weights": weights, "method": method, **options}
        response = acme.post("/v1/adapters/merge", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["owner"] == "acme"

    shapes = module_shapes(tensor_shapes(weight_files(llama.model_dir)))
    config, tensors = merge_adapters([read_adapter_dir(llama.adapter_dirs[s]) for s in sources], weights, method, shapes, **options)
    (tmp_path / "merged").mkdir()
    save_file(tensors, tmp_path / "merged" / "adapter_model.safetensors")
    (tmp_path / "merged" / "adapter_config.json").write_text(json.dumps(config))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ACME, max_retries=0)
    got = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == tokenizer.decode(peft_greedy(llama, tmp_path / "merged"), skip_special_tokens=True)


@pytest.mark.parametrize(
    "key, sources, status, words",
    [
        (ACME, ["r4-qv", "globex-own"], 404, "does not exist"),  # another tenant's adapter: missing
        (ACME, ["r4-qv", "shared-one"], 403, "only their own"),
        (ACME, ["r4-qv", "nowhere"], 404, "does not exist"),
    ],
    ids=["another-tenants", "shared", "missing"],
)
def test_a_tenant_may_merge_only_its_own_adapters(server, key, sources, status, words):
    with client_for(server, key) as client:
        response = client.post("/v1/adapters/merge", json={"name": "nope", "adapters": sources, "weights": [1, 1], "method": "cat"})
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_an_admin_may_merge_shared_and_tenant_adapters(server):
    with client_for(server, ADMIN) as admin:
        body = {"name": "ops-cat", "adapters": ["shared-one", "r4-qv"], "weights": [1, 1], "method": "cat"}
        response = admin.post("/v1/adapters/merge", json=body)
    assert response.status_code == 201
    assert response.json()["owner"] == "operators"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"adapters": ["r4-qv", "r8-attn"], "weights": [1, 1], "method": "linear"}, None, "equal rank"),
        ({"adapters": ["r4-qv", "r8-attn"], "weights": [1], "method": "cat"}, "weights", "weight"),
        ({"adapters": ["r4-qv", "r8-attn"], "weights": [1, 1], "method": "average"}, "method", "method"),
        ({"adapters": ["r8-attn", "r8-all-rslora"], "weights": [1, 1], "method": "ties", "density": 1.5}, "density", "density"),
        ({"adapters": ["r4-qv"], "weights": [1], "method": "cat"}, "adapters", "at least 2"),
        ({"adapters": ["r4-qv", "r8-attn"], "weights": [1, 1], "method": "cat", "shout": True}, "shout", "unknown field"),
    ],
    ids=["unequal-rank-linear", "weights-count", "unknown-method", "density", "one-adapter", "unknown-field"],
)
def test_an_impossible_merge_is_a_400_naming_the_problem_and_stores_nothing(server, body, param, words):
    with client_for(server, ACME) as acme:
        response = acme.post("/v1/adapters/merge", json={"name": "bad-merge", **body})
        listed = [record["name"] for record in acme.get("/v1/adapters").json()["data"]]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words.lower() in error["message"].lower()
    if param is not None:
        assert error["param"] == param
    assert "bad-merge" not in listed


def test_loraplex_merge_writes_a_shared_adapter_into_the_store(llama, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("r4-qv", "r8-attn"):
        (store / name).symlink_to(llama.adapter_dirs[name], target_is_directory=True)
    loraplex = str(Path(sys.executable).with_name("loraplex"))
    command = [loraplex, "merge", "--model", str(llama.model_dir), "--store", str(store), "--adapters", "r4-qv,r8-attn",
               "--weights", "0.5,0.5", "--method", "cat", "--out", "both"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cli_env(COLUMNS="300"))
    assert result.returncode == 0, result.stderr
    assert "rank 12" in result.stderr
    assert json.loads((store / "both" / "adapter_config.json").read_text())["r"] == 12
    refused = subprocess.run([*command[:-1], "both"], capture_output=True, text=True, timeout=300, env=cli_env(COLUMNS="300"))
    assert refused.returncode == 2 and "exists" in refused.stderr

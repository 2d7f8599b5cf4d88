"""`serve --merge-adapter`: one adapter merged into the base, served under its name with LoRA off."""

import shutil

import httpx
import openai
import pytest

from conftest import PeftOracle
from live_server import LiveServer, server_config, upload
from loraplex.errors import AdapterNotFound

PROMPT = [17, 42, 99, 5, 130, 64]
ADAPTER = "r8-all-rslora"


@pytest.fixture(scope="module")
def merged(llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(llama.adapter_dirs[ADAPTER], store / "tenant-a")
    shutil.copytree(llama.adapter_dirs["r4-qv"], store / "other")
    config = server_config(llama.model_dir, store).model_copy(update={"merge_adapter": "tenant-a", "served_model_name": None})
    with LiveServer(config) as live:
        yield live


def test_the_merged_model_is_listed_under_the_adapters_name_alone(merged):
    models = httpx.get(merged.url + "/v1/models").json()["data"]
    assert [model["id"] for model in models] == ["tenant-a"]


def test_the_lora_path_is_off(merged):
    assert merged.engine.wrappers == {}
    assert merged.services.catalog.names() == []


def test_the_merged_model_generates_what_the_adapter_does_unmerged(merged, llama, tokenizer):
    client = openai.OpenAI(base_url=merged.url + "/v1", api_key="unused", max_retries=0)
    got = client.completions.create(model="tenant-a", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    want, _ = PeftOracle(llama).generate(PROMPT, ADAPTER, 10)
    assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert got.usage.completion_tokens == 10


def test_adapter_uploads_are_refused_naming_the_reason(merged, llama):
    with httpx.Client(base_url=merged.url) as client:
        response = upload(client, "late", llama.adapter_dirs["r4-qv"])
    assert response.status_code == 422
    assert "LoRA off" in response.json()["error"]["message"]


def test_an_unknown_merge_adapter_stops_start_up_with_a_clear_error(llama, tmp_path):
    config = server_config(llama.model_dir, tmp_path).model_copy(update={"merge_adapter": "absent"})
    with pytest.raises(AdapterNotFound, match="no adapter 'absent' in the store"):
        with LiveServer(config):
            pass

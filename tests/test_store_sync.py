"""Replicas on one shared store: an upload, a replacement or a delete through one is served by the other within 5 s.

Two live servers on 127.0.0.1 share one store directory, as replicas on the Kubernetes RWX volume
do. Each polls the store (`--store-poll-interval`, 0.2 s here) and takes up what the other changed;
a directory that cannot be served is reported and skipped, and stops nothing.
"""

import shutil

import httpx
import pytest

from hostile import wait_until
from live_server import LiveServer, server_config, upload

PROPAGATION_SECONDS = 5.0
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture
def replicas(llama, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(llama.adapter_dirs["r4-qv"], store / "r4-qv")
    config = server_config(llama.model_dir, store, max_loras=4, max_lora_rank=16).model_copy(update={"store_poll_interval": 0.2})
    with LiveServer(config) as first, LiveServer(config) as second:
        with httpx.Client(base_url=first.url, timeout=60) as a, httpx.Client(base_url=second.url, timeout=60) as b:
            yield a, b, store


def models(client) -> set[str]:
    return {model["id"] for model in client.get("/v1/models").json()["data"]}


def complete(client, model: str):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json=body)


def text(client, model: str) -> str:
    response = complete(client, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_an_upload_through_one_replica_is_served_by_the_other(replicas, llama):
    a, b, _ = replicas
    assert upload(a, "fresh", llama.adapter_dirs["r8-attn"]).status_code == 201
    assert wait_until(lambda: "fresh" in models(b), PROPAGATION_SECONDS)
    assert text(b, "fresh") == text(a, "fresh")
    assert text(b, "fresh") != text(b, "tiny-base")


def test_a_replacement_reaches_the_other_replica_and_its_new_outputs(replicas, llama):
    a, b, _ = replicas
    assert upload(a, "fresh", llama.adapter_dirs["r8-attn"]).status_code == 201
    assert wait_until(lambda: "fresh" in models(b), PROPAGATION_SECONDS)
    old = text(b, "fresh")
    assert upload(a, "fresh", llama.adapter_dirs["r16-mlp"], overwrite=True).status_code == 200
    new = text(a, "fresh")
    assert new != old
    assert wait_until(lambda: text(b, "fresh") == new, PROPAGATION_SECONDS)


def test_a_delete_through_one_replica_reaches_the_other(replicas):
    a, b, _ = replicas
    assert "r4-qv" in models(b)
    assert a.delete("/v1/adapters/r4-qv").status_code == 200
    assert wait_until(lambda: "r4-qv" not in models(b), PROPAGATION_SECONDS)
    assert complete(b, "r4-qv").status_code == 404


def test_a_directory_that_cannot_be_served_is_skipped_and_stops_nothing(replicas, llama):
    a, b, store = replicas
    broken = store / "broken"
    shutil.copytree(llama.adapter_dirs["r8-attn"], broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    assert upload(a, "fresh", llama.adapter_dirs["r8-attn"]).status_code == 201
    assert wait_until(lambda: "fresh" in models(b), PROPAGATION_SECONDS)  # the poll after the broken one still ran
    assert "broken" not in models(a) | models(b)
    assert complete(b, "broken").status_code == 404
    assert text(b, "fresh") == text(a, "fresh")

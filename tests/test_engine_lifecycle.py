"""A model the engine cannot run fails at start; an engine that dies while serving says so and exits.

The start-up check runs every path of a step once. A tiny Mistral of hidden size 96 in nf4 has
widths bitsandbytes' packed CPU kernel refuses: such layers are sent to bitsandbytes' generic
4-bit path (with a warning naming them) and the model serves exactly what transformers computes
on the same quantized model; without that rerouting the engine refuses to start, naming the layer.
An engine loop that dies turns `/health` 503, answers every request with a 503 naming the error,
and makes `run` return 1, so a supervisor restarts the process.
"""

import threading

import bitsandbytes as bnb
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import loraplex.engine.base_model as base_model
from hostile import wait_until
from live_server import LiveServer, server_config
from loraplex.config import EngineConfig
from loraplex.engine.engine import MAX_FAILED_STEPS, Engine
from loraplex.engine.request import SamplingParams
from loraplex.errors import ModelLoadError
from loraplex.server import build_services, run
from test_serve_process import free_port
from tiny import make_model

PROMPT = [5, 17, 42, 99, 130, 64, 7]


@pytest.fixture(scope="module")
def odd_mistral(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return make_model(root / "mistral-96", "mistral", seed=5, hidden_size=96, intermediate_size=160,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def nf4_engine(model_dir) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), device="cpu", quantize="nf4", max_loras=2, max_model_len=64))


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the packed kernel needs AVX512-BF16")
def test_nf4_layers_the_packed_kernel_refuses_serve_on_bitsandbytes_generic_path_exactly(odd_mistral):
    engine = nf4_engine(odd_mistral)

    assert engine.base.warnings and "generic 4-bit path" in engine.base.warnings[0]
    assert "model.layers.0.self_attn.q_proj" in engine.base.warnings[0]
    completion = engine.generate([PROMPT], [None], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(odd_mistral, quantization_config=quantization, device_map="cpu")
    base_model._route_unpackable_nf4_layers(reference)
    inputs = torch.tensor([PROMPT])
    with torch.no_grad():
        out = reference.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=2)  # fmt: skip
    assert completion.output_ids == out[0, len(PROMPT) :].tolist()


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the packed kernel needs AVX512-BF16")
def test_a_model_the_engine_cannot_run_refuses_to_start_naming_the_layer(odd_mistral, monkeypatch):
    monkeypatch.setattr(base_model, "_route_unpackable_nf4_layers", lambda model: [])

    with pytest.raises(ModelLoadError) as refused:
        nf4_engine(odd_mistral)

    message = str(refused.value)
    assert "start-up check" in message and "model.layers.0.self_attn.q_proj" in message
    assert "nf4" in message


def kill_engine(engine: Engine, monkeypatch) -> None:
    def device_lost(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", device_lost)


def complete(url: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": "tiny-base", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_an_engine_that_dies_while_serving_turns_health_503_and_answers_503_naming_why(llama, tmp_path, monkeypatch):
    config = server_config(llama.model_dir, tmp_path / "store", max_num_seqs=1)
    with LiveServer(config) as live:
        assert complete(live.url).status_code == 200
        kill_engine(live.engine, monkeypatch)
        for _ in range(MAX_FAILED_STEPS):  # each step fails its one request, until the engine gives up
            failed = complete(live.url)
            assert failed.status_code == 500 and "device lost" in failed.json()["error"]["message"], failed.text
        assert wait_until(lambda: not live.engine.alive)

        health = httpx.get(f"{live.url}/health", timeout=10)
        assert health.status_code == 503 and "device lost" in health.json()["status"]
        refused = complete(live.url)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "engine_unavailable" and "device lost" in refused.json()["error"]["message"]


def test_an_engine_that_dies_makes_the_server_stop_with_a_non_zero_status(llama, tmp_path, monkeypatch):
    config = server_config(llama.model_dir, tmp_path / "store", max_num_seqs=1).model_copy(update={"port": free_port()})
    svc, _ = build_services(config)
    status: list[int] = []
    server = threading.Thread(target=lambda: status.append(run(svc)), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{config.port}"
    assert wait_until(lambda: _healthy(url), seconds=60)

    kill_engine(svc.engine, monkeypatch)
    for _ in range(MAX_FAILED_STEPS):
        complete(url)
    server.join(timeout=60)

    assert status == [1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False

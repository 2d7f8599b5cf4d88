"""Every way an adapter can be unservable on a base is refused, with a message naming the problem."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.errors import AdapterInvalid, AdapterNotFound
from loraplex.lora.adapter import read_adapter_dir
from tiny import make_adapter, make_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def engine(llama) -> Engine:
    return Engine(EngineConfig(model=str(llama.model_dir), max_loras=2, max_lora_rank=16))


@pytest.fixture
def good(llama, tmp_path) -> Path:
    """A fresh copy of a valid rank-8 adapter to spoil."""
    return Path(shutil.copytree(llama.adapter_dirs["r8-attn"], tmp_path / "adapter"))


def edit_config(path: Path, **fields) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(fields)
    (path / CONFIG).write_text(json.dumps(config))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS)


def test_a_valid_adapter_loads_with_its_metadata(engine, good):
    adapter = engine.load_adapter("ok", good)
    assert adapter.rank == 8 and adapter.alpha == 16
    assert adapter.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert adapter.modules is None and adapter.source.path == str(good.resolve())  # read back on demand
    validated = engine.validate_adapter("ok", *read_adapter_dir(good))
    assert len(validated.modules) == 2 * 4  # two layers, four projections
    assert adapter.nbytes == validated.nbytes > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"peft_type": "IA3"}, "only LoRA adapters are supported; this adapter has peft_type=IA3"),
        ({"use_dora": True}, "DoRA adapters"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "all"}, "bias='all'"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 4}, "lora_A has shape [8, 64], expected [4, 64]"),
    ],
)
def test_config_problems_are_refused(engine, good, fields, message):
    edit_config(good, **fields)
    with pytest.raises(AdapterInvalid) as error:
        engine.load_adapter("bad", good)
    assert message in str(error.value)


def test_rank_above_max_lora_rank_is_refused(llama, tmp_path):
    engine = Engine(EngineConfig(model=str(llama.model_dir), max_loras=2, max_lora_rank=8))
    with pytest.raises(AdapterInvalid, match="rank 16 exceeds max_lora_rank 8"):
        engine.load_adapter("big", llama.adapter_dirs["r16-mlp"])


def test_non_finite_values_are_refused(engine, good):
    def poison(tensors):
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")

    edit_tensors(good, poison)
    with pytest.raises(AdapterInvalid, match="non-finite values"):
        engine.load_adapter("nan", good)


def test_a_tensor_for_a_module_the_base_lacks_is_refused(engine, good):
    def add_embedding_lora(tensors):
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(256, 8)

    edit_tensors(good, add_embedding_lora)
    with pytest.raises(AdapterInvalid, match="targets module lm_head, which the base model does not have"):
        engine.load_adapter("lm", good)


def test_an_adapter_for_another_base_is_refused_on_shapes(engine, tmp_path):
    other = make_model(tmp_path / "wide", "llama", hidden_size=96, num_attention_heads=4)
    adapter_dir = make_adapter(other, tmp_path / "wide-adapter", rank=4, targets=("q_proj",))
    with pytest.raises(AdapterInvalid, match=r"lora_A has shape \[4, 96\], expected \[4, 64\]"):
        engine.load_adapter("wide", adapter_dir)


def test_an_adapter_matching_no_module_is_an_error_not_a_base_answer(engine, good):
    save_file({}, good / WEIGHTS)
    with pytest.raises(AdapterInvalid, match="matches no module of the base model"):
        engine.load_adapter("empty", good)


def test_a_missing_half_of_a_pair_is_refused(engine, good):
    edit_tensors(good, lambda t: t.pop(next(k for k in sorted(t) if "lora_B" in k)))
    with pytest.raises(AdapterInvalid, match="has lora_B missing"):
        engine.load_adapter("half", good)


def test_dora_magnitude_tensors_are_refused(engine, good):
    edit_tensors(good, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}))
    with pytest.raises(AdapterInvalid, match="DoRA"):
        engine.load_adapter("dora", good)


def test_pickle_weights_are_refused_without_unpickling(engine, good):
    (good / WEIGHTS).unlink()
    marker = good / "unpickled"
    # A pickle that would create a file if anything ever unpickled it.
    payload = b"\x80\x04cbuiltins\nopen\n(S'" + str(marker).encode() + b"'\nS'w'\ntR."
    (good / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(AdapterInvalid, match="pickle file; loraplex reads safetensors only"):
        engine.load_adapter("pickled", good)
    (good / WEIGHTS).write_bytes(payload)
    with pytest.raises(AdapterInvalid, match="looks like a pickle"):
        engine.load_adapter("pickled", good)
    assert not marker.exists()


@pytest.mark.parametrize("first_bytes, modulus", [(b"\x80", 1 << 8), (b"PK", 1 << 16)], ids=["pickle-byte", "zip-bytes"])
def test_safetensors_whose_header_length_starts_like_a_pickle_or_zip_are_read(engine, good, first_bytes, modulus):
    """Found by the benchmark suite: about one random adapter in 256 has a header length 0x..80."""
    tensors = load_file(good / WEIGHTS)
    save_file(tensors, good / WEIGHTS, metadata={"format": "pt", "padding": ""})
    unpadded = int.from_bytes((good / WEIGHTS).read_bytes()[:8], "little")
    target = int.from_bytes(first_bytes, "little")
    target += -(-(unpadded - target) // modulus) * modulus  # the first such length >= unpadded
    for padding in range(target - unpadded - 8, target - unpadded + 9):  # headers are padded to 8 bytes
        save_file(tensors, good / WEIGHTS, metadata={"format": "pt", "padding": "x" * max(padding, 0)})
        if (good / WEIGHTS).read_bytes().startswith(first_bytes):
            break
    assert (good / WEIGHTS).read_bytes().startswith(first_bytes)
    assert engine.load_adapter("lookalike", good).name == "lookalike"


def test_garbage_weights_are_refused(engine, good):
    (good / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(AdapterInvalid, match="not a valid safetensors file"):
        engine.load_adapter("garbage", good)


def test_invalid_config_json_is_refused(engine, good):
    (good / CONFIG).write_text("{not json")
    with pytest.raises(AdapterInvalid, match="adapter_config.json is not valid JSON"):
        engine.load_adapter("json", good)


def test_a_missing_directory_is_not_found(engine, tmp_path):
    with pytest.raises(AdapterNotFound):
        engine.load_adapter("nowhere", tmp_path / "nowhere")

"""Indexing an adapter from its config and safetensors header: the structural checks of a full read, no tensor read."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from loraplex.errors import AdapterInvalid, AdapterMalformed
from loraplex.lora.index import parse_header
from test_adapter_validation import CONFIG, WEIGHTS, edit_config, edit_tensors, engine, good  # noqa: F401 (fixtures)

STRUCTURAL = {
    "peft type": (lambda d: edit_config(d, peft_type="IA3"), "only LoRA adapters are supported"),
    "DoRA": (lambda d: edit_config(d, use_dora=True), "DoRA adapters"),
    "rank against shapes": (lambda d: edit_config(d, r=4), "lora_A has shape [8, 64], expected [4, 64]"),
    "foreign module": (
        lambda d: edit_tensors(d, lambda t: t.update({
            "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(256, 8),
        })),
        "targets module lm_head, which the base model does not have",
    ),  # fmt: skip
    "half a pair": (lambda d: edit_tensors(d, lambda t: t.pop(next(k for k in sorted(t) if "lora_B" in k))), "has lora_B missing"),
    "integer weights": (
        lambda d: edit_tensors(d, lambda t: t.update({k: v.to(torch.int64) for k, v in t.items() if "lora_A" in k})),
        "expected a float dtype",
    ),
    "no tensors": (lambda d: save_file({}, d / WEIGHTS), "matches no module of the base model"),
}


@pytest.mark.parametrize("spoil, message", STRUCTURAL.values(), ids=STRUCTURAL.keys())
def test_the_index_refuses_what_a_full_read_refuses_with_the_same_message(engine, good, spoil, message):  # noqa: F811
    spoil(good)
    with pytest.raises(AdapterInvalid) as indexed:
        engine.index_adapter("bad", good)
    with pytest.raises(AdapterInvalid) as read:
        engine.load_adapter("bad", good)
    assert message in str(indexed.value) and str(indexed.value) == str(read.value)


def test_values_are_left_to_the_read(engine, good):  # noqa: F811
    edit_tensors(good, lambda t: t[next(k for k in t if "lora_B" in k)].fill_(float("nan")))
    assert engine.index_adapter("nan", good).modules is None  # the header is sound
    with pytest.raises(AdapterInvalid, match="non-finite"):
        engine.load_adapter("nan", good)


def header(entries: dict, data: int = 0) -> tuple[bytes, int]:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + data


BAD_HEADERS = {
    "not JSON": ((b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", 13), "not JSON"),
    "not an object": (header([1, 2]), "not an object"),
    "unknown dtype": (header({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1), "unknown dtype"),
    "negative shape": (header({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4), "no valid shape"),
    "bool offsets": (header({"t": {"dtype": "F32", "shape": [1], "data_offsets": [False, True]}}, 4), "data_offsets"),
    "range past the file": (header({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8), "byte range"),
    "range unlike the shape": (header({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 8), "byte range"),
}


@pytest.mark.parametrize("raw_and_size, message", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_malformed_header_is_refused_naming_what_is_wrong(raw_and_size, message):
    raw, size = raw_and_size
    with pytest.raises(AdapterMalformed, match=message):
        parse_header(raw, size)


def test_a_header_length_beyond_the_file_is_refused_without_reading_it(engine, good):  # noqa: F811
    (good / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(AdapterMalformed, match="header length is out of bounds"):
        engine.index_adapter("huge", good)


def test_the_metadata_entry_is_not_a_tensor():
    raw, size = header({"__metadata__": {"format": "pt"}, "t": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, 12)
    infos = parse_header(raw, size)
    assert list(infos) == ["t"] and infos["t"].shape == (2, 3) and infos["t"].floating


def test_a_config_that_is_not_json_is_refused(engine, good):  # noqa: F811
    (good / CONFIG).write_text("{")
    with pytest.raises(AdapterMalformed, match="not valid JSON"):
        engine.index_adapter("broken", good)

"""The frames between the server and its engine process: framing over a real pipe, and each value's
wire form read back equal to what was sent."""

import contextlib
import os
import threading

import pytest
import torch

from loraplex.engine.request import FinishReason, SamplingParams, TokenEvent
from loraplex.engine.stats import EngineSnapshot
from loraplex.engine.wire import (
    FrameReader,
    FrameWriter,
    adapter_from_wire,
    adapter_to_wire,
    event_from_wire,
    event_to_wire,
    params_from_wire,
    params_to_wire,
    snapshot_from_wire,
    snapshot_to_wire,
)
from loraplex.lora.adapter import LoraAdapter, LoraWeights


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    reader, writer = FrameReader(read_fd), FrameWriter(write_fd)
    yield reader, writer
    for end in (reader, writer):
        with contextlib.suppress(OSError):  # the test may have closed it
            end.close()


def frame_bytes(frames: list[list]) -> bytes:
    """The bytes a FrameWriter puts on the pipe for `frames`."""
    read_fd, write_fd = os.pipe()
    writer = FrameWriter(write_fd)
    for frame in frames:
        writer.send(frame)
    writer.close()
    data = b""
    while chunk := os.read(read_fd, 1 << 16):
        data += chunk
    os.close(read_fd)
    return data


def test_frames_come_out_whole_and_in_order_however_the_bytes_arrive():
    frames = [["add", "r1", [1, 2, 3], None, [4]], ["abort", "r2"], ["blob", b"\x00" * 5000]]
    data = frame_bytes(frames)
    read_fd, write_fd = os.pipe()
    reader = FrameReader(read_fd)
    got = []
    for cut in range(0, len(data), 7):  # 7 bytes at a time: headers and bodies split everywhere
        os.write(write_fd, data[cut : cut + 7])
        got += reader.read(0)
    os.close(write_fd)
    assert got == frames
    with pytest.raises(EOFError):
        reader.read(None)
    reader.close()


def test_read_waits_at_most_its_timeout_and_says_eof_when_the_writer_closes(pipe):
    reader, writer = pipe
    assert reader.read(0) == []
    assert reader.read(0.05) == []
    writer.send(["stop"])
    writer.close()
    assert reader.read(None) == [["stop"]]
    with pytest.raises(EOFError):
        reader.read(None)


def test_a_frame_larger_than_the_pipe_buffer_crosses_while_the_reader_reads(pipe):
    reader, writer = pipe
    big = ["adapter", os.urandom(3 << 20)]
    sender = threading.Thread(target=writer.send, args=(big,))
    sender.start()
    got = reader.read(30)
    sender.join(30)
    assert got == [big]


def test_sampling_params_cross_unchanged():
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=1 << 70, stop_token_ids=(4, 5), stop=("\n", "END"),
        ignore_eos=True, logprobs=2, prompt_logprobs=1,
    )  # fmt: skip
    assert params_from_wire(params_to_wire(params)) == params
    assert params_from_wire(params_to_wire(SamplingParams())) == SamplingParams()


@pytest.mark.parametrize(
    "event",
    [
        TokenEvent("r", 5, "é"),
        TokenEvent("r", 9, "x", -0.25, [(9, -0.25), (3, -1.5)], prompt_logprobs=[(-2.0, [(1, -0.5)], 3), (-0.5, [], 1)]),
        TokenEvent("r", None, "", finish_reason=FinishReason.ABORT),
        TokenEvent("r", None, "", finish_reason=FinishReason.ERROR, error="the engine stopped", fatal=True),
        TokenEvent("r", 2, "\ud800 lone surrogate", finish_reason=FinishReason.LENGTH),
    ],
)
def test_token_events_cross_unchanged(event):
    assert event_from_wire(event_to_wire(event)) == event


def test_snapshots_cross_unchanged():
    snapshot = EngineSnapshot(1.5, 2, 3, ("a", "b"), ("c",), 0.25, 1, 4, 5, 6, 7, 8)
    assert snapshot_from_wire(snapshot_to_wire(snapshot)) == snapshot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_cross_with_their_exact_tensors_and_version(dtype):
    modules = {
        "model.layers.0.self_attn.q_proj": LoraWeights(torch.randn(4, 16, dtype=dtype), torch.randn(32, 4, dtype=dtype), 0.5),
        "model.layers.1.mlp.down_proj": LoraWeights(torch.randn(8, 64, dtype=dtype)[:, ::2], torch.randn(16, 8, dtype=dtype), 2.0),
    }
    adapter = LoraAdapter("tenant-a", 8, 16.0, True, ["q_proj", "down_proj"], modules, 1234)
    back = adapter_from_wire(adapter_to_wire(adapter))
    assert (back.name, back.rank, back.alpha, back.use_rslora, back.target_modules, back.nbytes, back.uid) == (
        adapter.name, adapter.rank, adapter.alpha, adapter.use_rslora, adapter.target_modules, adapter.nbytes, adapter.uid,
    )  # fmt: skip
    assert set(back.modules) == set(modules)
    for name, weights in modules.items():
        assert back.modules[name].scaling == weights.scaling
        assert back.modules[name].lora_a.dtype == dtype and torch.equal(back.modules[name].lora_a, weights.lora_a)
        assert torch.equal(back.modules[name].lora_b, weights.lora_b)

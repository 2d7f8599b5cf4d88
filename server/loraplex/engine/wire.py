"""The frames between the server process and its engine process, and the values they carry.

Owns: the framing of both pipes (a 4-byte big-endian length, then a msgpack body that msgspec
decodes into plain lists, dicts and scalars: nothing is ever unpickled), `FrameReader` (whole
frames from a pipe, waiting at most a given time) and `FrameWriter`, and the wire forms of what
crosses: `SamplingParams`, `TokenEvent`, `EngineSnapshot` and a validated `LoraAdapter` (its
facts and source; the tensors, as safetensors bytes, only of one built in
memory). Which frames exist and what they mean is the two ends' business
(core_process.py, client.py); this module only moves them.
"""

import dataclasses
import fcntl
import os
import select
import struct

import msgspec
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from loraplex.engine.request import FinishReason, SamplingParams, TokenEvent
from loraplex.engine.stats import EngineSnapshot
from loraplex.lora.adapter import AdapterSource, LoraAdapter, LoraWeights

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = (1 << 32) - 1  # what the header can say; frames are the two processes' own
READ_CHUNK = 1 << 20  # bytes asked of the pipe per read
PIPE_BYTES = 1 << 20  # asked of the kernel for each pipe's buffer (Linux; best effort)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def widen_pipe(fd: int) -> None:
    """Ask for a larger pipe buffer, so a step's frame rarely waits on the reader (Linux only)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        try:
            fcntl.fcntl(fd, set_size, PIPE_BYTES)
        except OSError:  # over the user's pipe limit: the default buffer still works
            pass


class FrameWriter:
    """Writes whole frames to a blocking pipe; one thread at a time."""

    def __init__(self, fd: int):
        self._fd = fd

    def send(self, message: list) -> None:
        body = _encoder.encode(message)
        view = memoryview(_HEADER.pack(len(body)) + body)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        os.close(self._fd)


class FrameReader:
    """Reads whole frames from a pipe; one thread at a time.

    Raises EOFError from `read` once the writer has closed its end and every frame is read.

    Args:
        fd: the pipe's read end.
        wake_fd: another pipe's read end; a byte written there ends a waiting `read` early.
    """

    def __init__(self, fd: int, wake_fd: int | None = None):
        self._fd = fd
        self._wake_fd = wake_fd
        self._buffer = bytearray()
        self._poll = select.poll()  # poll, not select: no fd number is too large
        self._poll.register(fd, select.POLLIN)
        if wake_fd is not None:
            self._poll.register(wake_fd, select.POLLIN)

    def read(self, timeout: float | None) -> list[list]:
        """The frames complete now, else the first to arrive within `timeout` seconds (None: no limit).

        Returns [] when the time is up, or when woken through `wake_fd`.
        """
        frames = self._complete()
        while not frames:
            events = self._poll.poll(None if timeout is None else max(0, timeout * 1000))
            if not events:
                return []
            if self._wake_fd is not None and any(fd == self._wake_fd for fd, _ in events):
                os.read(self._wake_fd, 4096)
                if not any(fd == self._fd for fd, _ in events):
                    return []
            chunk = os.read(self._fd, READ_CHUNK)
            if not chunk:
                raise EOFError("the other process closed its pipe")
            self._buffer += chunk
            frames = self._complete()
        return frames

    def _complete(self) -> list[list]:
        frames, start, buffer = [], 0, self._buffer
        while len(buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + length
            if end > len(buffer):
                break
            frames.append(_decoder.decode(memoryview(buffer)[start + _HEADER.size : end]))
            start = end
        if start:
            del buffer[:start]
        return frames

    def close(self) -> None:
        os.close(self._fd)


def params_to_wire(params: SamplingParams) -> list:
    return list(dataclasses.astuple(params))


def params_from_wire(fields: list) -> SamplingParams:
    params = dict(zip((f.name for f in dataclasses.fields(SamplingParams)), fields, strict=True))
    return SamplingParams(**{**params, "stop_token_ids": tuple(params["stop_token_ids"]), "stop": tuple(params["stop"])})


def event_to_wire(event: TokenEvent) -> tuple:
    reason = event.finish_reason.value if event.finish_reason is not None else None
    return (
        event.request_id, event.token_id, event.text, event.logprob, event.top_logprobs, reason,
        event.prompt_logprobs, event.error, event.fatal, event.error_type,
    )  # fmt: skip


def event_from_wire(fields: list) -> TokenEvent:
    request_id, token_id, text, logprob, top, reason, prompt, error, fatal, error_type = fields
    return TokenEvent(
        request_id,
        token_id,
        text,
        logprob,
        None if top is None else [tuple(pair) for pair in top],
        None if reason is None else FinishReason(reason),
        None if prompt is None else [(lp, [tuple(pair) for pair in alternatives], rank) for lp, alternatives, rank in prompt],
        error,
        fatal,
        error_type,
    )


def snapshot_to_wire(snapshot: EngineSnapshot) -> list:
    return list(dataclasses.astuple(snapshot))


def snapshot_from_wire(fields: list) -> EngineSnapshot:
    snapshot = EngineSnapshot(*fields)
    return dataclasses.replace(
        snapshot,
        running_adapters=tuple(snapshot.running_adapters),
        waiting_adapters=tuple(snapshot.waiting_adapters),
        slot_uids=tuple(snapshot.slot_uids),
    )


def adapter_to_wire(adapter: LoraAdapter) -> list:
    """A validated adapter: its facts, its source, and (built in memory) its A and B as safetensors bytes."""
    facts = [adapter.name, adapter.rank, adapter.alpha, adapter.use_rslora, adapter.target_modules, adapter.nbytes, adapter.uid]
    source = adapter.source
    wired_source = None if source is None else [source.path, source.version, source.roots, source.max_bytes]
    if adapter.modules is None:
        return [facts, wired_source, None, None]
    tensors = {}
    for module, weights in adapter.modules.items():
        tensors[f"{module}.lora_A"] = weights.lora_a.contiguous()
        tensors[f"{module}.lora_B"] = weights.lora_b.contiguous()
    scalings = {module: weights.scaling for module, weights in adapter.modules.items()}
    return [facts, wired_source, scalings, save_safetensors_bytes(tensors)]


def adapter_from_wire(fields: list) -> LoraAdapter:
    """The adapter `adapter_to_wire` sent (already validated by the server: not checked again)."""
    facts, wired_source, scalings, raw = fields
    name, rank, alpha, use_rslora, target_modules, nbytes, uid = facts
    source = None
    if wired_source is not None:
        path, version, roots, max_bytes = wired_source
        source = AdapterSource(path, version, None if roots is None else tuple(roots), max_bytes)
    modules = None
    if raw is not None:
        tensors = load_safetensors_bytes(raw)
        modules = {
            module: LoraWeights(tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"], scaling)
            for module, scaling in scalings.items()
        }
    return LoraAdapter(name, rank, alpha, use_rslora, list(target_modules), modules, nbytes, uid, source)

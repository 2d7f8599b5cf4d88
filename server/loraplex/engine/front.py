"""What the HTTP layer calls on an engine beyond its primitives, written once for both engines.

Owns: `EngineFront`, the base of `Engine` (the engine in this process) and `EngineClient` (the
server's handle on an engine in its own process): checking PEFT contents against the base
(`validate_adapter`), reading and registering a PEFT directory (`load_adapter`), and the async
front door (`submit`, `bridge`). Each subclass defines the primitives these stand on: `config`,
`module_shapes`, `dtype`, `_bridges`, `register_adapter`, `adapter_tier`, `add_request` and `cancel`. Must not
hold state of its own.
"""

import asyncio
from collections.abc import Sequence
from pathlib import Path

import torch

from loraplex.config import EngineConfig
from loraplex.engine.request import SamplingParams, TokenEvent
from loraplex.engine.stream import LoopBridge, LoopBridges, RequestStream
from loraplex.errors import AdapterInvalid
from loraplex.lora.adapter import AdapterSource, LoraAdapter, ModuleShape, build_adapter, read_adapter_dir
from loraplex.lora.files import directory_version
from loraplex.lora.index import index_adapter


class EngineFront:
    """Adapter validation and the async front door, on top of a subclass's primitives.

    A subclass sets the attributes below and defines `register_adapter(adapter)`,
    `add_request(prompt_ids, adapter, params, request_id, sink)` and `cancel(request_id)`.
    """

    config: EngineConfig
    module_shapes: dict[str, ModuleShape]
    dtype: torch.dtype
    _bridges: LoopBridges

    def validate_adapter(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> LoraAdapter:
        """Check PEFT contents against this base without registering them."""
        self._require_lora()
        return build_adapter(name, config, tensors, self.module_shapes, self.config.max_lora_rank, self.dtype)

    def load_adapter(self, name: str, path: str | Path) -> LoraAdapter:
        """Read and validate the PEFT directory at `path` in full, and register it under `name`.

        The engine keeps the directory's place, not its weights: they are read back into host
        memory when a request needs them (and refused if the directory has changed since).

        Returns:
            The registered version (its `modules` None, its `source` the directory).
        """
        self._require_lora()
        try:
            version = directory_version(path)
        except OSError:
            version = ""  # the read below says what is missing
        config, tensors = read_adapter_dir(Path(path))
        adapter = self.validate_adapter(name, config, tensors).on_disk(AdapterSource(str(Path(path).resolve()), version))
        self.register_adapter(adapter)
        return adapter

    def index_adapter(
        self, name: str, path: str | Path, max_bytes: int | None = None, roots: tuple[Path, ...] | None = None
    ) -> LoraAdapter:
        """Validate the directory at `path` from its config and safetensors header alone, without registering it.

        What the store's start-up and sync use: no tensor is read until a request needs it.
        """
        self._require_lora()
        return index_adapter(path, name, self.module_shapes, self.config.max_lora_rank, self.dtype, max_bytes, roots)

    def _require_lora(self) -> None:
        if not self.config.enable_lora:
            raise AdapterInvalid("this server runs with LoRA off (it serves one merged model), so it takes no adapters")

    def submit(
        self,
        prompt_ids: Sequence[int],
        adapter: str | LoraAdapter | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request from async code; iterate the returned stream for its tokens."""
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request_id = self.add_request(prompt_ids, adapter, params, request_id, self.bridge().sink(events.put_nowait))
        return RequestStream(request_id, events, self.cancel)

    def bridge(self) -> LoopBridge:
        """The bridge that delivers this engine's events on the running event loop (one per loop)."""
        return self._bridges.for_running_loop()

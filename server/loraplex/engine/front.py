"""What the HTTP layer calls on an engine beyond its primitives, written once for both engines.

Owns: `EngineFront`, the base of `Engine` (the engine in this process) and `EngineClient` (the
server's handle on an engine in its own process): checking PEFT contents against the base
(`validate_adapter`), reading and registering a PEFT directory (`load_adapter`), and the async
front door (`submit`, `bridge`). Each subclass defines the primitives these stand on: `config`,
`module_shapes`, `dtype`, `_bridges`, `register_adapter`, `add_request` and `cancel`. Must not
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
from loraplex.lora.adapter import LoraAdapter, ModuleShape, build_adapter, load_adapter


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
        """Read, validate and register the PEFT directory at `path` under `name`."""
        self._require_lora()
        adapter = load_adapter(Path(path), name, self.module_shapes, self.config.max_lora_rank, self.dtype)
        self.register_adapter(adapter)
        return adapter

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

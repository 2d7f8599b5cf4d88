"""One Ray Serve replica: a loraplex engine and app whose adapters are Ray's multiplexed models.

Owns: `LoraplexReplica`, which builds loraplex's services over the whole adapter store (indexed
at start-up, kept in step with it by the store poller, as a single server is) and answers requests
with loraplex's own app (via `bridge.call_asgi`); and `Placement`, the object Ray's multiplexing
LRU holds per adapter: what tells Ray's router this replica is warm for it. Placing an adapter
reads nothing: the engine's host tier reads it when its first request is queued, and keeps it
while its bytes allow; an adapter Ray's LRU lets go of stays registered (any replica serves any
store adapter, and `/v1/models` lists them all), it is only no longer preferred here.
It must not decide routing (the router does) nor write to the adapter store (it serves it read-only).
"""

import asyncio
import json
from collections.abc import AsyncIterator

from deploy.ray.bridge import HttpCall, call_asgi
from loraplex.api.app import create_app
from loraplex.api.errors import error_body, status_of
from loraplex.config import ServerConfig
from loraplex.errors import LoraplexError
from loraplex.server import build_services
from loraplex.service.catalog import AdapterCatalog
from loraplex.service.store import check_name
from loraplex.tenancy import DEFAULT_TENANT, Principal
from ray import serve

REPLICA_HEADER = "x-loraplex-replica"
_ADMIN = Principal(DEFAULT_TENANT, "admin")


class Placement:
    """A store adapter Ray's multiplexing has placed on this replica (its router prefers this replica for it).

    Raises AdapterNotFound when the store has no such adapter, even after a fresh look at the store
    (one written moments ago, before this replica's poller saw it).
    """

    def __init__(self, catalog: AdapterCatalog, name: str):
        check_name(name)
        if name not in catalog.names():
            catalog.sync_store()
        catalog.get(name, _ADMIN)
        self.name = name


class LoraplexReplica:
    """A Ray Serve deployment class: `answer` answers one `HttpCall` with loraplex's app.

    Args:
        config: the replica's server config; `adapters` is the store it serves from, and
            `engine.max_loras` the number of adapters Ray's multiplexing keeps here.
    """

    def __init__(self, config: ServerConfig):
        self._config = config
        self._services, _ = build_services(config)
        self._app = create_app(self._services)
        self._services.engine.start()
        if self._services.store_sync is not None:  # the app's lifespan, which starts it, does not run here
            self._services.store_sync.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def place(name: str) -> Placement:
            return await asyncio.to_thread(Placement, self._services.catalog, name)

        self._place = serve.multiplexed(max_num_models_per_replica=config.engine.max_loras)(place)

    async def answer(self, call: HttpCall) -> AsyncIterator[dict | bytes]:
        """Answer `call`; the adapter named by the multiplexed model id is placed here first (Ray's routing memory)."""
        name = serve.get_multiplexed_model_id()
        try:
            if name:
                await self._place(name)
        except LoraplexError as exc:
            status, error_type, code = status_of(exc)
            body = json.dumps(error_body(str(exc), error_type, exc.param or "model", code)).encode()
            yield {"status": status, "headers": [("content-type", "application/json"), (REPLICA_HEADER, self.replica_id)]}
            yield body
            return
        async for part in call_asgi(self._app, call):
            if isinstance(part, dict):
                part["headers"].append((REPLICA_HEADER, self.replica_id))
            yield part

    def adapters(self) -> dict:
        """What this replica holds: its id, and where each registered adapter is in its engine's tiers."""
        engine = self._services.engine
        return {"replica": self.replica_id, "tiers": {name: engine.adapter_tier(a) for name, a in sorted(engine.adapters.items())}}

    def check_health(self) -> None:
        if not self._services.engine.alive:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        if self._services.store_sync is not None:
            self._services.store_sync.stop()
        self._services.engine.stop()

"""One Ray Serve replica: a loraplex engine and app whose adapters are Ray's multiplexed models.

Owns: `LoraplexReplica`, which builds loraplex's services with an empty adapter catalog and answers
requests with loraplex's own app (via `bridge.call_asgi`); and `RegisteredAdapter`, the object
Ray's multiplexing LRU holds per adapter. Loading a model registers the store adapter in the
catalog (and so in the engine); Ray's eviction calls `RegisteredAdapter.__del__`, which unloads it.
The LRU holds `max_loras` adapters, what the engine can mix in one step, so Ray's cache and
loraplex's registry hold the same names. An adapter is unloaded only once no request on this
replica holds it, so a request never finds the adapter it was routed for gone.
It must not decide routing (the router does) nor write to the adapter store (it serves it read-only).
"""

import asyncio
import json
import threading
from collections.abc import AsyncIterator

from deploy.ray.bridge import HttpCall, call_asgi
from loraplex.api.app import create_app
from loraplex.api.errors import error_body, status_of
from loraplex.config import ServerConfig
from loraplex.errors import AdapterNotFound, LoraplexError
from loraplex.server import build_services
from loraplex.service.catalog import AdapterCatalog
from loraplex.service.store import check_name
from loraplex.tenancy import DEFAULT_TENANT, Principal
from ray import serve

REPLICA_HEADER = "x-loraplex-replica"
_ADMIN = Principal(DEFAULT_TENANT, "admin")
_LEASE_ATTEMPTS = 3


class RegisteredAdapter:
    """A store adapter registered in one replica's catalog for as long as Ray's LRU keeps it."""

    def __init__(self, catalog: AdapterCatalog, name: str, path: str):
        self.name = name
        self._catalog = catalog
        self._users = 0
        self._unloaded = True  # until registered: a failed load must not unload a namesake
        self._changed = threading.Condition()
        catalog.load_path(name, path, _ADMIN)
        self._unloaded = False

    def acquire(self) -> bool:
        """Hold the adapter for one request; False if it was unloaded already."""
        with self._changed:
            if self._unloaded:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._changed:
            self._users -= 1
            self._changed.notify_all()

    def __del__(self) -> None:
        # Ray calls this (in a worker thread) when its LRU evicts the adapter; GC may call it again.
        with self._changed:
            self._changed.wait_for(lambda: self._users == 0)
            if self._unloaded:
                return
            self._unloaded = True
        try:
            self._catalog.unload(self.name, _ADMIN)
        except AdapterNotFound:
            pass


class LoraplexReplica:
    """A Ray Serve deployment class: `answer` answers one `HttpCall` with loraplex's app.

    Args:
        config: the replica's server config; `adapters` is the store it serves from, and
            `engine.max_loras` the number of adapters Ray's multiplexing keeps here.
    """

    def __init__(self, config: ServerConfig):
        self._config = config
        self._services, _ = build_services(config, load_store=False)
        self._app = create_app(self._services)
        self._services.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def load(name: str) -> RegisteredAdapter:
            check_name(name)
            return await asyncio.to_thread(RegisteredAdapter, self._services.catalog, name, str(config.adapters / name))

        self._adapter = serve.multiplexed(max_num_models_per_replica=config.engine.max_loras)(load)

    async def _lease(self, name: str) -> RegisteredAdapter:
        for _ in range(_LEASE_ATTEMPTS):
            adapter = await self._adapter(name)
            if adapter.acquire():
                return adapter
        raise AdapterNotFound(f"adapter {name!r} kept being evicted while loading; retry")

    async def answer(self, call: HttpCall) -> AsyncIterator[dict | bytes]:
        """Answer `call`; the adapter named by the multiplexed model id is registered first."""
        name = serve.get_multiplexed_model_id()
        try:
            adapter = await self._lease(name) if name else None
        except LoraplexError as exc:
            status, error_type, code = status_of(exc)
            body = json.dumps(error_body(str(exc), error_type, exc.param or "model", code)).encode()
            yield {"status": status, "headers": [("content-type", "application/json"), (REPLICA_HEADER, self.replica_id)]}
            yield body
            return
        try:
            async for part in call_asgi(self._app, call):
                if isinstance(part, dict):
                    part["headers"].append((REPLICA_HEADER, self.replica_id))
                yield part
        finally:
            if adapter is not None:
                adapter.release()

    def adapters(self) -> dict:
        """What this replica holds: its id and the adapters its engine has registered."""
        return {"replica": self.replica_id, "adapters": sorted(self._services.engine.adapters)}

    def check_health(self) -> None:
        if not self._services.engine.alive:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        self._services.engine.stop()

"""The serving process: build everything from one `ServerConfig`, run it, drain it on SIGTERM.

Owns: assembling `Services` (keys, engine, metrics, adapter store and catalog; or, with
`merge_adapter`, an engine over one adapter merged into the base, with LoRA off) and running the
app on uvicorn in this process, with a drain on the first SIGTERM or SIGINT: new `/v1` requests
get 503 and `/health` turns 503 while running requests finish, for at most `drain_timeout`
seconds; then the process exits. A second signal exits at once.
"""

import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from loraplex.api.app import create_app
from loraplex.api.auth import ApiKeys
from loraplex.api.services import Services
from loraplex.config import ServerConfig
from loraplex.engine.engine import Engine
from loraplex.errors import AdapterNotFound
from loraplex.export import export_merged
from loraplex.metrics import Metrics
from loraplex.registry.catalog import AdapterCatalog
from loraplex.registry.store import AdapterStore, check_name


def build_services(config: ServerConfig, load_store: bool = True) -> tuple[Services, list[tuple[str, str]]]:
    """Load the base model and the adapter store.

    Args:
        config: the server's configuration.
        load_store: register every stored adapter now; False starts with none registered (the
            Ray replicas register adapters as Ray's multiplexing asks for them).

    Returns:
        The services, and (name, problem) for each stored adapter that could not be served.
    """
    keys = ApiKeys.load(config.api_keys) if config.api_keys is not None else ApiKeys.open()
    engine = merged_engine(config) if config.merge_adapter is not None else Engine(config.engine)
    metrics = Metrics(lambda: engine.snapshot, config.metrics_compat, config.model_name)
    engine.observer = metrics
    store = AdapterStore(config.adapters)
    catalog = AdapterCatalog(
        engine, store, {config.model_name}, config.max_adapter_bytes, config.allowed_lora_roots, metrics.adapter_registered
    )
    problems = catalog.load_store() if load_store and engine.config.enable_lora else []
    return Services(config, engine, catalog, keys, metrics), problems


def merged_engine(config: ServerConfig) -> Engine:
    """An engine over the base with `merge_adapter` merged in, LoRA off.

    The merge reads the original full-precision checkpoint (never quantized weights) into a
    temporary checkpoint, which the engine loads (and quantizes, with `--quantize`) and drops.
    """
    name = config.merge_adapter
    check_name(name)
    adapter_dir = config.adapters / name
    if not adapter_dir.is_dir():
        raise AdapterNotFound(f"--merge-adapter {name}: there is no adapter {name!r} in the store {config.adapters}")
    with tempfile.TemporaryDirectory(prefix="loraplex-merged-") as merged_dir:
        export_merged(Path(config.engine.model), adapter_dir, Path(merged_dir))
        return Engine(config.engine.model_copy(update={"model": merged_dir, "enable_lora": False}))


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first exit signal drains before it stops."""

    def __init__(self, config: uvicorn.Config, svc: Services):
        super().__init__(config)
        self._svc = svc

    def handle_exit(self, sig, frame) -> None:
        if self._svc.draining:
            super().handle_exit(sig, frame)
            return
        self._svc.draining = True
        threading.Thread(target=self._drain, name="loraplex-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self._svc.config.drain_timeout
        while self._svc.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def run(svc: Services) -> None:
    """Serve until a signal has drained the server."""
    config = svc.config
    uv_config = uvicorn.Config(
        create_app(svc),
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_graceful_shutdown=2,
    )
    _DrainingServer(uv_config, svc).run()

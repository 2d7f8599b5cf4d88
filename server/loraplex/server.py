"""The serving process: build everything from one `ServerConfig`, run it, drain it on SIGTERM.

Owns: assembling `Services` (keys, engine, metrics, adapter store and catalog with the
`--lora-modules` adapters, chat template renderer; or, with `merge_adapter`, an engine over one
adapter merged into the base, with LoRA off; the engine runs in a process of its own unless
`engine_process` is off) and running the app on uvicorn in this process, with a drain on the first
SIGTERM or SIGINT: new `/v1` requests get 503 and `/health` turns 503 while running requests
finish, for at most `drain_timeout` seconds; then the engine stops and the process exits. A second
signal exits at once.
"""

import logging
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from loraplex.api.app import create_app
from loraplex.api.auth import ApiKeys
from loraplex.api.chat_template import ChatTemplateRenderer
from loraplex.api.prompt_encoder import PromptEncoder
from loraplex.api.services import Services
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.client import EngineClient
from loraplex.engine.engine import Engine
from loraplex.errors import AdapterNotFound, LoraplexError
from loraplex.export import export_merged
from loraplex.metrics import Metrics
from loraplex.service.catalog import AdapterCatalog
from loraplex.service.store import AdapterStore, check_name
from loraplex.service.store_sync import StoreSync
from loraplex.tenancy import DEFAULT_TENANT, Principal

log = logging.getLogger(__name__)


def build_services(config: ServerConfig, load_store: bool = True) -> tuple[Services, list[tuple[str, str]]]:
    """Load the base model and the adapter store.

    Args:
        config: the server's configuration.
        load_store: register every stored adapter now; False starts with none registered (the
            Ray replicas register adapters as Ray's multiplexing asks for them).

    Returns:
        The services, and (name, problem) for each stored adapter that could not be served.

    Raises:
        ValueError: a `--lora-modules` adapter cannot be served (the engine is stopped first).
    """
    keys = ApiKeys.of(config)
    weights = keys.tenant_weights()
    engine_config = config.engine.model_copy(update={"tenant_weights": weights}) if weights else config.engine
    engine = merged_engine(config) if config.merge_adapter is not None else make_engine(config, engine_config)
    metrics = Metrics(lambda: engine.snapshot, config.metrics_compat, config.model_name, lambda: catalog.footprint())
    engine.observer = metrics
    store = AdapterStore(config.adapters)
    chat_templates = ChatTemplateRenderer(config.chat_template_timeout)
    special_tokens = engine.base.tokenizer.special_tokens_map
    modules = config.lora_module_paths()
    roots = config.allowed_lora_roots + tuple(path for _, path in modules)  # the operator named these
    catalog = AdapterCatalog(
        engine, store, {config.model_name}, config.max_adapter_bytes, roots,
        metrics.adapter_registered, lambda template: chat_templates.check(template, special_tokens),
    )  # fmt: skip
    serves_store = load_store and engine.config.enable_lora
    problems = catalog.load_store() if serves_store else []
    try:
        load_lora_modules(catalog, modules)
    except ValueError:
        chat_templates.close()
        engine.stop()
        raise
    # Replicas sharing the store see each other's uploads and deletes (Ray's replicas load on demand instead).
    sync = StoreSync(catalog, config.store_poll_interval) if serves_store and config.store_poll_interval > 0 else None
    prompts = PromptEncoder(engine.base.tokenizer, engine.max_model_len)
    return Services(config, engine, catalog, keys, metrics, chat_templates, prompts, store_sync=sync), problems


def load_lora_modules(catalog: AdapterCatalog, modules: list[tuple[str, Path]]) -> None:
    """Serve each `--lora-modules` adapter as a shared one, as vLLM's load does; raises ValueError naming a bad entry."""
    operator = Principal(DEFAULT_TENANT, "admin")
    for name, path in modules:
        try:
            catalog.load_path(name, str(path), operator)
        except LoraplexError as exc:
            raise ValueError(f"--lora-modules {name}={path}: {exc}") from None


def make_engine(config: ServerConfig, engine: EngineConfig) -> Engine | EngineClient:
    """The engine `engine` describes: in a process of its own, or on a thread of this one."""
    return EngineClient(engine) if config.engine_process else Engine(engine)


def merged_engine(config: ServerConfig) -> Engine | EngineClient:
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
        return make_engine(config, config.engine.model_copy(update={"model": merged_dir, "enable_lora": False}))


CUT_SECONDS = 0.5  # after the drain timeout: time for cut requests to send their last event
CLOSE_SECONDS = 0.3  # uvicorn's wait for connections to close once every response has ended
WATCH_SECONDS = 0.2  # how often the watchdog looks at the engine loop


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first exit signal drains before it stops, and a dead engine stops it.

    First signal: `/health` and new `/v1` requests answer 503 while running requests finish, for at
    most `drain_timeout` seconds; requests still running then are cut (a stream ends with an SSE
    error event, a plain request gets a 503), and the process exits within about a second more.
    A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, svc: Services):
        super().__init__(config)
        self._svc = svc

    def handle_exit(self, sig, frame) -> None:
        if self._svc.draining:
            self.should_exit = self.force_exit = True
            return
        self._svc.draining = True
        threading.Thread(target=self._drain, name="loraplex-drain", daemon=True).start()

    def _drain(self) -> None:
        svc = self._svc
        _wait_for_idle(svc, svc.config.drain_timeout)
        if svc.in_flight > 0:
            log.warning("drain timeout: cutting %d running requests", svc.in_flight)
            svc.engine.abort_all()
            _wait_for_idle(svc, CUT_SECONDS)
        self.should_exit = True

    def watch_engine(self) -> None:
        """Stop serving (the process then exits non-zero) if the engine loop dies."""
        while not self.should_exit:
            if self._svc.engine.failure is not None:
                log.error("the engine stopped (%s); shutting down so a supervisor can restart the server", self._svc.engine.failure)
                self.should_exit = True
                return
            time.sleep(WATCH_SECONDS)


def _wait_for_idle(svc: Services, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while svc.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.02)


def run(svc: Services) -> int:
    """Serve until a signal has drained the server, or the engine died.

    Returns:
        The process's exit status: 0 after a drain, 1 when the engine loop died.
    """
    config = svc.config
    uv_config = uvicorn.Config(
        create_app(svc),
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_graceful_shutdown=CLOSE_SECONDS,
    )
    server = _DrainingServer(uv_config, svc)
    threading.Thread(target=server.watch_engine, name="loraplex-watchdog", daemon=True).start()
    server.run()
    return 1 if svc.engine.failure is not None else 0

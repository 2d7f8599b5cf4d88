"""A real loraplex server on 127.0.0.1 for tests: uvicorn on a free port, in a background thread.

The server is the one `loraplex serve` runs (same `build_services`, same app); only the process
differs, so tests can also look at its engine directly. Subprocess tests (signals, restarts) use
`loraplex serve` itself.
"""

import os
import threading
import time
from pathlib import Path

import uvicorn

from loraplex.api.app import create_app
from loraplex.api.services import Services
from loraplex.config import EngineConfig, ServerConfig
from loraplex.server import build_services


def server_config(
    model_dir: Path, adapters: Path, api_keys: Path | None = None, engine_process: bool = False, **engine
) -> ServerConfig:
    """A small float32 CPU server (unless `engine` says otherwise) over `model_dir`, its adapter store at `adapters`.

    The engine runs on a thread of the test's process (tests look at its state) unless
    `engine_process` asks for the process of its own that `loraplex serve` gives it.
    """
    defaults = {"dtype": "float32", "device": "cpu", "max_loras": 4, "max_model_len": 256}
    engine_config = EngineConfig(model=str(model_dir), **{**defaults, **engine})
    return ServerConfig(
        engine=engine_config, served_model_name="tiny-base", adapters=adapters, api_keys=api_keys, engine_process=engine_process
    )


class LiveServer:
    """`with LiveServer(config) as server:` serves at `server.url` until the block ends."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.services: Services | None = None
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LiveServer":
        self.services, self.problems = build_services(self.config)
        app = create_app(self.services)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    @property
    def engine(self):
        return self.services.engine


def upload(client, name: str, adapter_dir: Path, **fields):
    """POST an adapter directory (as peft's save_pretrained wrote it) to /v1/adapters."""
    files = {
        "config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
    }
    data = {"name": name, **{key: str(value).lower() if isinstance(value, bool) else value for key, value in fields.items()}}
    return client.post("/v1/adapters", files=files, data=data)


def cli_env(**variables: str) -> dict[str, str]:
    """A small environment for `loraplex` subprocesses: PATH, the thread count, and `variables`.

    OMP_NUM_THREADS is kept (conftest sets it to 1): on a shared 2-core machine, a subprocess
    with two spinning torch threads ran several times slower than with one.
    """
    return {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **variables}


"""The fleet benchmark's start-up part: `loraplex serve` on a store of N adapters, timed and weighed.

Owns: `FleetStore` and `build_store` (a store of N adapters written fast: a few real ones, the rest
hard links), `guarded_server` (a loraplex started with a memory guard and a start-up bound, every
way it can fail told apart by `StartFailed`), and `measure_startup`: wall seconds from the spawn
until `/health` answers 200 (the route is up only once the store is loaded), the peak resident
memory (VmHWM) of the server process and of its engine process, and how many of the store's
adapters `GET /v1/models` lists. The fleet load runs (fleet_load.py) start their servers here
too. It must not drive load or render results.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from transformers import PretrainedConfig

from loadtest.checkpoints import make_linked_adapters
from loadtest.processes import MemoryGuard, children, command_line, memory_bytes
from loadtest.servers import ServerExited, ServerProcess, ServerTimeout, free_port, loraplex_args
from loadtest.suite_config import SuiteConfig

ENGINE_MODULE = "loraplex.engine.core_process"  # what the server runs its engine process as
WEIGHTS = "adapter_model.safetensors"
READY, TIMEOUT, OVER_MEMORY, EXITED = "ready", "timeout", "over memory bound", "exited"
LOG_TAIL = 2000  # characters of a failed server's log kept in the results


@dataclass(frozen=True)
class FleetStore:
    """A store of `adapters` adapter directories `lora-0` ... under `path`.

    Args:
        path: the store's root.
        adapters: directories in it.
        rank: their LoRA rank.
        written: how many were written with peft/safetensors; the others hard-link their files.
        disk_bytes: the bytes of the written ones' files, all the disk the store takes.
        adapter_bytes: one adapter's safetensors file (header included).
        seconds: how long building it took.
    """

    path: Path
    adapters: int
    rank: int
    written: int
    disk_bytes: int
    adapter_bytes: int
    seconds: float

    def names(self) -> list[str]:
        return [f"lora-{index}" for index in range(self.adapters)]

    def describe(self) -> str:
        return (
            f"store of {self.adapters:,} rank-{self.rank} adapters built in {self.seconds:.1f} s: {self.written} written with "
            f"peft/safetensors, {self.adapters - self.written:,} hard links to their files (os.link), "
            f"{self.disk_bytes / 2**20:.1f} MiB on disk, {self.adapter_bytes / 2**10:,.0f} KiB of weights each"
        )


def build_store(base: PretrainedConfig, config: SuiteConfig, path: Path, count: int, distinct: int = 4) -> FleetStore:
    """Write a store of `count` rank-`config.rank` adapters on all seven projections of `base` at `path`."""
    started = time.monotonic()
    paths = make_linked_adapters(base, path, count, config.rank, distinct, seed=config.seed, dtype=getattr(torch, config.dtype))
    written = list(paths.values())[: min(distinct, count)]
    disk = sum(file.stat().st_size for directory in written for file in directory.iterdir())
    adapter_bytes = (path / "lora-0" / WEIGHTS).stat().st_size
    return FleetStore(path, count, config.rank, len(written), disk, adapter_bytes, time.monotonic() - started)


class StartFailed(Exception):
    """A server that did not become ready.

    Args:
        status: `TIMEOUT`, `OVER_MEMORY` or `EXITED`.
        seconds: from the spawn until it was given up on.
        log: the tail of its log.
    """

    def __init__(self, status: str, seconds: float, log: str):
        super().__init__(f"{status} after {seconds:.1f} s")
        self.status, self.seconds, self.log = status, seconds, log


@dataclass
class Started:
    """A ready server, the seconds it took, and the guard watching its memory."""

    server: ServerProcess
    seconds: float
    guard: MemoryGuard


@contextmanager
def guarded_server(name: str, args: list[str], port: int, env: dict[str, str], startup_timeout: float, max_rss: int) -> Iterator[Started]:
    """Start `python -m <args>`, wait for `/health`, yield it, stop it; its session is killed past `max_rss` bytes.

    Raises:
        StartFailed: it did not become ready (it is stopped by then).
    """
    spawned = time.monotonic()
    server = ServerProcess(name, args, port, env, startup_timeout)
    with MemoryGuard(server.pid, max_rss) as guard:
        try:
            server.wait_ready()
        except ServerTimeout:
            raise StartFailed(TIMEOUT, time.monotonic() - spawned, server.log.read_text()[-LOG_TAIL:]) from None
        except ServerExited:
            status = EXITED if guard.tripped_at is None else OVER_MEMORY
            raise StartFailed(status, time.monotonic() - spawned, server.log.read_text()[-LOG_TAIL:]) from None
        try:
            yield Started(server, time.monotonic() - spawned, guard)
        finally:
            server.stop()
    server.log.unlink(missing_ok=True)


def engine_pid(server_pid: int) -> int | None:
    """The server's engine process among its children; None when the engine runs in the server's own process."""
    for pid in children(server_pid):
        if ENGINE_MODULE in command_line(pid):
            return pid
    return None


def listed_adapters(url: str, names: list[str]) -> int:
    """How many of `names` `GET /v1/models` lists."""
    served = {model["id"] for model in httpx.get(url + "/v1/models", timeout=120).json()["data"]}
    return len(served.intersection(names))


@dataclass
class StartupResult:
    """One start of loraplex on a store.

    Args:
        model_config: the base's shape.
        adapters: N, the adapters in the store.
        status: `READY`, or why it did not become ready.
        seconds: spawn to `/health` 200 when ready, else until it was given up on.
        server_peak_rss, engine_peak_rss: VmHWM in bytes of the server process and of its engine
            process, read once every adapter was listed; None when not ready (or no engine process).
        models_listed: the store's adapters `GET /v1/models` lists.
        log: the tail of the server's log when it did not become ready.
    """

    model_config: str
    adapters: int
    status: str
    seconds: float
    server_peak_rss: int | None = None
    engine_peak_rss: int | None = None
    models_listed: int | None = None
    log: str | None = None


def measure_startup(model: Path, store: FleetStore, config: SuiteConfig, startup_timeout: float, max_rss: int) -> StartupResult:
    """Start loraplex on `store` the suite's way (`loraplex_args`) and measure its start-up.

    Args:
        model: the base checkpoint's directory.
        store: the adapters.
        config: the device, dtype, slots, batch bound and threads of the server.
        startup_timeout: seconds it may take to be ready; past them it is reported as `TIMEOUT`.
        max_rss: resident bytes of all its processes at which it is killed and reported as `OVER_MEMORY`.
    """
    port = free_port()
    args = loraplex_args(model, store.path, port, config.device, config.dtype, config.max_loras, config.concurrency)
    try:
        with guarded_server(f"loraplex-{store.adapters}", args, port, config.server_env, startup_timeout, max_rss) as started:
            listed = listed_adapters(started.server.url, store.names())
            engine = engine_pid(started.server.pid)
            return StartupResult(
                config.model_config, store.adapters, READY, started.seconds,
                server_peak_rss=memory_bytes(started.server.pid),
                engine_peak_rss=None if engine is None else memory_bytes(engine),
                models_listed=listed,
            )  # fmt: skip
    except StartFailed as failure:
        return StartupResult(config.model_config, store.adapters, failure.status, failure.seconds, log=failure.log)

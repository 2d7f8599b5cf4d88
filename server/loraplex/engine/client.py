"""The server's handle on its engine process: the face of `Engine` the HTTP layer uses, over two pipes.

Owns: starting the engine process (core_process.py, a fresh interpreter, never forked from one
that holds torch's threads) and waiting for it to say ready; the facts it reported (lengths,
vocabulary, module shapes, dtype); the checks `Engine.add_request` makes, made here first so a bad
request is refused at once with the same error; the bounded queue's count; the adapter versions
new requests may name; and two threads. One writes the outbox to the engine, so no caller ever
waits on the pipe (an adapter's tensors are megabytes). The other reads each step's report and
hands its events to the requests' sinks, its observations to the observer, and its snapshot to
whoever reads `snapshot`. When the process dies, or reports that its loop broke, every open
request gets a fatal error event and `failure` says why.

Must not: run the model or touch the engine's state, which lives in the other process.
"""

import logging
import os
import queue
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer

from loraplex import errors
from loraplex.config import EngineConfig
from loraplex.engine import core_process
from loraplex.engine.front import EngineFront
from loraplex.engine.request import FinishReason, SamplingParams, TokenEvent, check_prompt
from loraplex.engine.stats import EngineObserver
from loraplex.engine.stream import LoopBridges, Sink
from loraplex.engine.wire import (
    FrameReader,
    FrameWriter,
    adapter_to_wire,
    event_from_wire,
    params_to_wire,
    snapshot_from_wire,
    widen_pipe,
)
from loraplex.errors import AdapterNotFound, EngineUnavailable, QueueFull
from loraplex.interpreter import module_command, module_environment
from loraplex.lora.adapter import LoraAdapter, ModuleShape
from loraplex.tenancy import DEFAULT_TENANT

log = logging.getLogger(__name__)

STOP_SECONDS = 30.0  # how long `stop` waits for the engine process to finish and exit before killing it


@dataclass(frozen=True)
class EngineBase:
    """What the HTTP layer reads of `Engine.base` when the model lives in the engine process."""

    tokenizer: object
    device: str
    dtype: str
    quantize: str
    name: str
    warnings: list[str] = field(default_factory=list)


def _start_error(kind: str, message: str) -> Exception:
    """The engine process's start-up error, as the class it raised when that is one of ours."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.LoraplexError):
        return cls(message)
    if kind == "ValueError":
        return ValueError(message)
    return EngineUnavailable(f"the engine process could not start: {kind}: {message}")


class EngineClient(EngineFront):
    """An engine in its own process, driven like an in-process `Engine` by the HTTP layer.

    Args:
        config: the engine configuration (sent to the engine process, which loads the model).
        observer: receives the engine's observations, replayed here once per step.

    Raises:
        ModelLoadError, ValueError, EngineUnavailable: the engine process could not start.
    """

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None):
        self.config = config
        self.observer = observer or EngineObserver()
        self.failure: str | None = None  # why the engine stopped, once it has
        self.adapters: dict[str, LoraAdapter] = {}
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()  # one order for adds and adapter changes: the pipe's
        self._queued = 0  # requests sent but never admitted yet (the bounded queue)
        self._host_states: dict[str, str] = {}  # uid -> host-tier state, as the engine last reported
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._bridges = LoopBridges(self.cancel)
        self._started = False
        self._stopped = threading.Event()
        self._process, self._reader, self._writer = self._spawn()
        try:
            self._writer.send(["config", config.model_dump_json()])
            facts = self._wait_ready()
            tokenizer = AutoTokenizer.from_pretrained(config.model)
        except BaseException:
            self._kill()
            raise
        self.max_model_len: int = facts["max_model_len"]
        self.vocab_size: int = facts["vocab_size"]
        self.module_shapes = {name: ModuleShape(*widths) for name, widths in facts["module_shapes"].items()}
        self.dtype: torch.dtype = getattr(torch, facts["dtype"])
        self.base = EngineBase(tokenizer, facts["device"], facts["dtype"], facts["quantize"], facts["name"], facts["warnings"])
        self.snapshot = snapshot_from_wire(facts["snapshot"])
        self.kv_summary: str = facts["kv_summary"]
        self.kernel_backend: str = facts["kernel_backend"]
        threading.Thread(target=self._write_outbox, name="loraplex-engine-writer", daemon=True).start()
        self._reader_thread = threading.Thread(target=self._read_reports, name="loraplex-engine-reader", daemon=True)
        self._reader_thread.start()

    def _spawn(self) -> tuple[subprocess.Popen, FrameReader, FrameWriter]:
        to_engine_read, to_engine_write = os.pipe()
        from_engine_read, from_engine_write = os.pipe()
        widen_pipe(to_engine_write)
        argv = module_command(core_process.__name__, f"--read-fd={to_engine_read}", f"--write-fd={from_engine_write}")
        try:
            process = subprocess.Popen(argv, pass_fds=(to_engine_read, from_engine_write), env=module_environment())
        finally:
            os.close(to_engine_read)
            os.close(from_engine_write)
        return process, FrameReader(from_engine_read), FrameWriter(to_engine_write)

    def _wait_ready(self) -> dict:
        try:
            frame = self._reader.read(None)[0]
        except EOFError:
            status = self._process.wait()
            raise EngineUnavailable(f"the engine process exited (status {status}) before it was ready") from None
        if frame[0] == "failed":
            raise _start_error(frame[2], frame[1])
        if frame[0] != "ready":
            raise EngineUnavailable(f"the engine process said {frame[0]!r} where it should have said ready")
        return frame[1]

    # ----- adapters -------------------------------------------------------------------------

    def register_adapter(self, adapter: LoraAdapter) -> None:
        """Make `adapter` the version new requests for its name get; running ones keep theirs."""
        wire = adapter_to_wire(adapter)
        with self._lock:
            self.adapters[adapter.name] = adapter
            self._outbox.put(["adapter", wire])

    def adapter_tier(self, adapter: LoraAdapter) -> str:
        """Where this version is now: device (in a slot), host, loading, failed, or disk."""
        if adapter.uid in self.snapshot.slot_uids:
            return "device"
        state = self._host_states.get(adapter.uid)
        return "disk" if state is None else ("host" if state == "ready" else state)

    def remove_adapter(self, name: str) -> None:
        """Forget `name`; requests already running on it finish, then its slot is freed."""
        with self._lock:
            if self.adapters.pop(name, None) is None:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            self._outbox.put(["remove", name])

    # ----- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        adapter: str | LoraAdapter | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        sink: Sink | None = None,
        *,
        bounded: bool = True,
        tenant: str = DEFAULT_TENANT,
    ) -> str:
        """Queue a request; its events go to `sink` from the reader thread. Returns its id."""
        params = params or SamplingParams()
        prompt_ids = check_prompt(prompt_ids, self.max_model_len, self.vocab_size)
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if isinstance(adapter, str):
                if adapter not in self.adapters:
                    raise AdapterNotFound(f"adapter {adapter!r} is not loaded")
                adapter = self.adapters[adapter]
            elif adapter is not None and self.adapters.get(adapter.name) is not adapter:
                raise AdapterNotFound(f"adapter {adapter.name!r} was replaced or removed while this request was prepared")
            if self.failure is not None:
                raise EngineUnavailable(f"the engine stopped after an error and takes no requests: {self.failure}")
            max_queue = self.config.max_queue
            if bounded and max_queue is not None and self._queued >= max_queue:
                raise QueueFull(f"the queue is full ({max_queue} requests waiting); retry later")
            self._queued += 1
            self._sinks[request_id] = sink or (lambda event: None)
            version = None if adapter is None else [adapter.name, adapter.uid]
            self._outbox.put(["add", request_id, prompt_ids, version, params_to_wire(params), tenant])
        return request_id

    def cancel(self, request_id: str) -> None:
        """Abort a request: its KV blocks and slot reference are freed at the engine's next step."""
        self._outbox.put(["abort", request_id])

    def abort_all(self) -> None:
        """Abort every request at the engine's next step (a shutdown cutting what still runs)."""
        self._outbox.put(["abort_all"])

    # ----- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Begin serving (the engine process already steps whenever it has work)."""
        self._started = True

    def stop(self) -> None:
        """Abort what still runs, stop the engine process and wait for it to exit."""
        self._started = False
        if self._process.poll() is None:
            self._outbox.put(["stop"])
            self._outbox.put(None)
            self._stopped.wait(STOP_SECONDS)
            try:
                self._process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("the engine process did not exit in %.0f s; killing it", STOP_SECONDS)
                self._kill()
        self._reader_thread.join(STOP_SECONDS)
        self._end_all(FinishReason.ABORT, None)

    @property
    def alive(self) -> bool:
        return self._started and self.failure is None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The engine process's id (what a supervisor or a test would signal)."""
        return self._process.pid

    def _kill(self) -> None:
        self._process.kill()
        self._process.wait()

    # ----- the two threads ------------------------------------------------------------------

    def _write_outbox(self) -> None:
        while True:
            frame = self._outbox.get()
            if frame is None:
                return
            try:
                self._writer.send(frame)
            except OSError:  # the engine process is gone; the reader says so
                return

    def _read_reports(self) -> None:
        try:
            while True:
                for frame in self._reader.read(None):
                    if frame[0] == "step":
                        self._apply(*frame[1:])
                    elif frame[0] == "failed":
                        self._fail(frame[1])
                    elif frame[0] == "stopped":
                        self._stopped.set()
        except EOFError:
            if not self._stopped.is_set():
                status = self._process.wait()
                self._fail(f"the engine process exited unexpectedly (status {status})")
        except Exception as exc:  # a broken report: nothing after it can be trusted
            log.exception("could not read the engine process's report")
            self._fail(f"the engine process's report could not be read: {type(exc).__name__}: {exc}")
            self._kill()
        finally:
            self._stopped.set()

    def _apply(self, events: list, observations: dict, snapshot: list, releases: int, tiers: dict) -> None:
        """One step's report: events to their sinks, observations to the observer, the snapshot, host-tier changes."""
        if releases:
            with self._lock:
                self._queued -= releases
        observer = self.observer
        for num_seqs in observations["steps"]:
            observer.step(num_seqs)
        for prompt_tokens, seconds in observations["first"]:
            observer.first_token(prompt_tokens, seconds)
        for gap in observations["gaps"]:
            observer.next_token(gap)
        for reason, seconds, queued in observations["ended"]:
            observer.request_ended(FinishReason(reason), seconds, queued)
        for seconds in observations["loads"]:
            observer.adapter_loaded(seconds)
        for seconds in observations["host_loads"]:
            observer.host_loaded(seconds)
        for uid, state in tiers.items():
            if state is None:
                self._host_states.pop(uid, None)
            else:
                self._host_states[uid] = state
        self.snapshot = snapshot_from_wire(snapshot)
        sinks = self._sinks
        for fields in events:
            event = event_from_wire(fields)
            sink = sinks.pop(event.request_id) if event.finish_reason is not None else sinks.get(event.request_id)
            if sink is not None:
                self._deliver(sink, event)

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("the engine stopped: %s", message)
        self._end_all(FinishReason.ERROR, f"the engine stopped after an error: {self.failure}")

    def _end_all(self, reason: FinishReason, message: str | None) -> None:
        """End every request still open here: those in transit, or whose engine is gone."""
        with self._lock:
            open_sinks, self._sinks = self._sinks, {}
        for request_id, sink in open_sinks.items():
            event = TokenEvent(request_id, None, "", finish_reason=reason, error=message, fatal=message is not None)
            self._deliver(sink, event)

    @staticmethod
    def _deliver(sink: Sink, event: TokenEvent) -> None:
        try:
            sink(event)
        except Exception:  # one listener's fault stays its own
            log.exception("could not deliver an event of request %s", event.request_id)

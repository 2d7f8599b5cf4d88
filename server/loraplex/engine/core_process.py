"""The engine process: an `Engine` in an interpreter of its own, stepping and reporting to the server.

Owns: the program `python -m loraplex.engine.core_process --read-fd R --write-fd W`, which reads
the engine's config, builds the engine (model, slots, warm-up), says ready with the facts the
server needs, and then loops: it applies the server's frames (requests, aborts, adapters) at step
boundaries, runs a step, and sends one frame per step with every event of that step, the
metrics' observations, the snapshot and the queue places given back. So the step never waits on
the HTTP side's GIL, and the HTTP side wakes once per step, not once per token.

It ignores SIGINT and SIGTERM (the server drains, then tells it to stop) and exits when told to,
or when the server's end of the pipe closes. Must not: open sockets, read anything but its pipe,
or let an exception out of the loop without first reporting it.

Frames in (server → engine): ["config", json], ["add", id, prompt, [adapter name, uid] | None, params, tenant],
["abort", id], ["abort_all"], ["adapter", wire adapter], ["remove", name], ["stop"].
Frames out: ["ready", facts], ["step", events, observations, snapshot, places given back, host-tier
changes {uid: state or None}],
["failed", message, error class], ["stopped"].
"""

import argparse
import logging
import os
import signal
import sys

from loraplex import errors
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, TokenEvent
from loraplex.engine.stats import EngineObserver
from loraplex.engine.wire import (
    FrameReader,
    FrameWriter,
    adapter_from_wire,
    event_to_wire,
    params_from_wire,
    snapshot_to_wire,
    widen_pipe,
)

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.5  # the longest the loop waits with work it cannot run yet (a safety net beside the wake pipe)


class ObservationLog(EngineObserver):
    """Keeps a step's observations as plain numbers, for the server's metrics to replay."""

    def __init__(self):
        self._log = self._empty()

    @staticmethod
    def _empty() -> dict:
        return {"steps": [], "first": [], "gaps": [], "ended": [], "loads": [], "host_loads": []}

    def take(self) -> dict:
        """The observations since the last take, as a frame carries them."""
        taken, self._log = self._log, self._empty()
        return taken

    def step(self, num_seqs: int) -> None:
        self._log["steps"].append(num_seqs)

    def first_token(self, prompt_tokens: int, seconds: float) -> None:
        self._log["first"].append((prompt_tokens, seconds))

    def next_token(self, gap: float) -> None:
        self._log["gaps"].append(gap)

    def request_ended(self, reason: FinishReason, seconds: float, queued: float) -> None:
        self._log["ended"].append((reason.value, seconds, queued))

    def adapter_loaded(self, seconds: float) -> None:
        self._log["loads"].append(seconds)

    def host_loaded(self, seconds: float) -> None:
        self._log["host_loads"].append(seconds)


class EngineCore:
    """The engine and its two pipes: applies frames, steps, reports.

    Args:
        engine: the engine, its observer an `ObservationLog`.
        reader: frames from the server.
        writer: frames to the server.
    """

    def __init__(self, engine: Engine, reader: FrameReader, writer: FrameWriter):
        self.engine = engine
        self._reader = reader
        self._writer = writer
        self._events: list[TokenEvent] = []
        self._releases = engine.queue_releases
        self._refused = 0  # requests refused here: their queue places are given back too
        self._snapshot = engine.snapshot
        self.stopping = False

    def run(self) -> int:
        """Step until told to stop (0) or the server is gone (0), or the loop broke (1)."""
        engine = self.engine
        ran = True  # step at once: frames that came with the config may have queued requests
        while not self.stopping:
            # Wait only when the last step ran nothing: for a frame, a finished adapter read
            # (the wake pipe), or, with work waiting, at most IDLE_SECONDS.
            timeout = 0 if ran else (IDLE_SECONDS if engine.has_work() else None)
            try:
                frames = self._reader.read(timeout)
            except EOFError:
                log.warning("the server closed its pipe; the engine process exits")
                return 0
            try:
                for frame in frames:
                    self.handle(frame)
                ran = engine.step() if frames or engine.has_work() else False
            except BaseException as exc:  # the engine's state can no longer be trusted
                engine.halt(exc)
                self.report()
                self._writer.send(["failed", engine.failure, type(exc).__name__])
                return 1
            self.report()
        engine.stop()
        self.report()
        self._writer.send(["stopped"])
        return 0

    def handle(self, frame: list) -> None:
        kind = frame[0]
        engine = self.engine
        if kind == "add":
            _, request_id, prompt_ids, version, params, tenant = frame
            adapter = None if version is None else engine.adapters.get(version[0])
            if version is not None and (adapter is None or adapter.uid != version[1]):
                self._refuse(request_id, "its adapter was replaced or removed before the request reached the engine")
                return
            try:
                engine.add_request(
                    prompt_ids, adapter, params_from_wire(params), request_id, self._events.append, bounded=False, tenant=tenant
                )
            except errors.LoraplexError as exc:  # the server checks first; this is the engine's own word
                self._refuse(request_id, str(exc))
        elif kind == "abort":
            engine.cancel(frame[1])
        elif kind == "abort_all":
            engine.abort_all()
        elif kind == "adapter":
            engine.register_adapter(adapter_from_wire(frame[1]))
        elif kind == "remove":
            if frame[1] in engine.adapters:
                engine.remove_adapter(frame[1])
        elif kind == "stop":
            self.stopping = True
        else:
            raise ValueError(f"unknown frame {kind!r} from the server")

    def _refuse(self, request_id: str, message: str) -> None:
        self._refused += 1
        self._events.append(TokenEvent(request_id, None, "", finish_reason=FinishReason.ERROR, error=message))

    def report(self) -> None:
        """Send what changed since the last report, in one frame (nothing when nothing changed)."""
        engine = self.engine
        observations = engine.observer.take()
        releases = engine.queue_releases - self._releases + self._refused
        tiers = engine.host.take_changes()
        changed = self._events or releases or tiers or engine.snapshot is not self._snapshot or any(observations.values())
        if not changed:
            return
        self._releases, self._refused = engine.queue_releases, 0
        self._snapshot = engine.snapshot
        events = [event_to_wire(e) for e in self._events]
        self._events.clear()  # in place: every request's sink appends to this list
        self._writer.send(["step", events, observations, snapshot_to_wire(engine.snapshot), releases, tiers])


def _facts(engine: Engine) -> dict:
    base = engine.base
    return {
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "module_shapes": {name: [s.in_features, s.out_features] for name, s in engine.module_shapes.items()},
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "quantize": base.quantize,
        "name": base.name,
        "warnings": list(base.warnings),
        "kv_summary": engine.kv_summary,
        "kernel_backend": engine.ops.name,
        "snapshot": snapshot_to_wire(engine.snapshot),
    }


def _ring(fd: int) -> None:
    """Wake the loop from a loader thread (a full wake pipe already will)."""
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="loraplex's engine process (started by the server, not by hand)")
    parser.add_argument("--read-fd", type=int, required=True)
    parser.add_argument("--write-fd", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [engine process] %(name)s: %(message)s")
    widen_pipe(args.write_fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    reader, writer = FrameReader(args.read_fd, wake_read), FrameWriter(args.write_fd)
    try:
        (kind, config_json), *early = reader.read(None)
        if kind != "config":
            raise ValueError(f"the first frame must be the config, got {kind!r}")
        engine = Engine(EngineConfig.model_validate_json(config_json), observer=ObservationLog())
        engine.host.record_changes = True
        engine.on_wake = lambda: _ring(wake_write)
    except EOFError:
        return 0
    except Exception as exc:
        log.exception("the engine could not start")
        writer.send(["failed", str(exc), type(exc).__name__])
        return 1
    writer.send(["ready", _facts(engine)])
    core = EngineCore(engine, reader, writer)
    for frame in early:
        core.handle(frame)
    return core.run()


if __name__ == "__main__":
    status = main()
    # Nothing is left to write but the logs; the model's and torch's teardown takes seconds that the
    # server's drain, which waits for this process, has no room for (the server skips it too).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

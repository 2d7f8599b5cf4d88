"""The server's handle on one chat-template sandbox process: start it, talk to it, kill it.

Owns: starting the worker program (`template_worker`) as a fresh interpreter (exec'd, never
forked from the server, which holds torch's threads), sending a request frame and waiting for the
reply with a deadline (poll, so no fd number is too large), refusing a reply that is too long or
malformed, and killing and reaping the process. Must not: be used by two threads at once (only
`interrupt` may come from another), or unpickle anything (frames are JSON).
"""

import json
import os
import select
import subprocess
import time

from loraplex.api import template_worker
from loraplex.errors import EngineFailed
from loraplex.interpreter import module_command, module_environment

WORKER_START_TIMEOUT = 30.0  # seconds a new worker may take to start (not counted as render time)


class WorkerLost(Exception):
    """The worker died or broke the protocol; it has been killed."""


class WorkerTimedOut(WorkerLost):
    """The worker did not answer by the deadline; it has been killed."""


class TemplateProcess:
    """One sandbox process and the two pipes to it; used by one thread at a time.

    Args:
        timeout: seconds the worker gives one render before it answers that it timed out.
        max_output_chars: the longest prompt the worker renders.
        memory_bytes: the worker's address-space limit.

    Raises:
        EngineFailed: the process cannot start, or does not say ready in WORKER_START_TIMEOUT.
    """

    def __init__(self, timeout: float, max_output_chars: int, memory_bytes: int):
        self._max_reply_bytes = max_output_chars * 12 + (1 << 16)  # ASCII JSON: up to 12 bytes a character
        argv = module_command(
            template_worker.__name__,
            f"--timeout={timeout}",
            f"--max-output-chars={max_output_chars}",
            f"--memory-bytes={memory_bytes}",
        )
        env = module_environment()
        try:
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError as exc:
            raise EngineFailed(f"the chat template sandbox cannot start: {exc}") from None
        self._requests = self._process.stdin.fileno()
        self._replies = self._process.stdout.fileno()
        os.set_blocking(self._requests, False)
        try:
            self._receive(time.monotonic() + WORKER_START_TIMEOUT)
        except WorkerLost as exc:
            raise EngineFailed(f"the chat template sandbox did not start: {exc} (see the server log)") from None

    def ask(self, request: dict, timeout: float) -> dict:
        """The reply to `request` (`{"text"}` or `{"error", "message"}`), due within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self._send(template_worker.encode_frame(request), deadline)
        reply = self._receive(deadline)
        if isinstance(reply, dict) and (
            isinstance(reply.get("text"), str) or {type(reply.get(key)) for key in ("error", "message")} == {str}
        ):
            return reply
        self._lose("it sent a reply of the wrong shape")

    def alive(self) -> bool:
        return self._process.poll() is None

    def interrupt(self) -> None:
        """Kill the process but leave the pipes to the thread using them (it sees the end of file)."""
        self._process.kill()

    def kill(self) -> None:
        """Kill the process, reap it and close the pipes; only by the thread that holds the worker."""
        self._process.kill()
        self._process.wait()
        self._process.stdin.close()
        self._process.stdout.close()

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._wait(self._requests, select.POLLOUT, deadline)
            try:
                view = view[os.write(self._requests, view) :]
            except BlockingIOError:
                continue
            except OSError:
                self._lose("it closed its end of the pipe")

    def _receive(self, deadline: float) -> dict:
        length = template_worker.frame_length(self._read(template_worker.HEADER_BYTES, deadline))
        if length > self._max_reply_bytes:
            self._lose(f"it sent a reply of {length} bytes")
        try:
            return json.loads(self._read(length, deadline))
        except ValueError:
            self._lose("it sent a reply that is not JSON")

    def _read(self, count: int, deadline: float) -> bytes:
        chunks, left = [], count
        while left:
            self._wait(self._replies, select.POLLIN, deadline)
            chunk = os.read(self._replies, min(left, 1 << 20))
            if not chunk:
                self._lose(self._exit_status())
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        poller = select.poll()
        poller.register(fd, event)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerTimedOut("it did not answer in time")
            if poller.poll(left * 1000):
                return

    def _exit_status(self) -> str:
        self._process.kill()  # in case it only closed the pipe: its status then says we killed it
        code = self._process.wait()
        return f"it was killed by signal {-code}" if code < 0 else f"it exited with status {code}"

    def _lose(self, reason: str):
        self.kill()
        raise WorkerLost(reason)

"""The chat-template worker: the program each sandbox process runs, and the frames it speaks.

Owns: the frame format of the pipe between the server and a worker (a 4-byte big-endian length,
then ASCII JSON: lone surrogates survive, and nobody unpickles what a template touched), and the
worker's loop (`main`, run as `python -m loraplex.api.template_worker`): set the address-space
limit, say ready, then for each request render under a deadline (SIGALRM) and an output bound and
answer one reply that names any problem. Must not: import anything heavy (no torch, no
transformers: it starts fast and small under its memory limit), or let an exception out of a
render (every problem becomes a reply).
"""

import argparse
import json
import os
import resource
import signal
import struct
import sys
from collections import OrderedDict

import jinja2
from jinja2.exceptions import TemplateSyntaxError

from loraplex.api.template_sandbox import TemplateRejected, ValueTooLarge, sandbox_environment

_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size
COMPILED_CACHE_SIZE = 32  # templates kept compiled per worker (a server sees few distinct ones)
MAX_MESSAGE_CHARS = 1000  # an exception's message is cut to this in a reply


def encode_frame(payload: dict) -> bytes:
    """One frame: the length, then `payload` as ASCII JSON (lone surrogates survive the trip)."""
    body = json.dumps(payload).encode("ascii")
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    return _HEADER.unpack(header)[0]


def _read_exactly(fd: int, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> dict | None:
    """The next request, or None when the server has closed the pipe."""
    header = _read_exactly(fd, HEADER_BYTES)
    if header is None:
        return None
    body = _read_exactly(fd, frame_length(header))
    return None if body is None else json.loads(body)


def _write_frame(fd: int, payload: dict) -> None:
    data = memoryview(encode_frame(payload))
    while data:
        data = data[os.write(fd, data) :]


class _RenderDeadline(BaseException):
    """The render's time is up (a BaseException so nothing on the way can swallow it)."""


class TemplateWorker:
    """Renders requests in this process, each under a deadline and an output bound.

    Args:
        timeout: seconds one render (compiling included) may take.
        max_output_chars: the longest prompt a render may produce (also the bound on built values).
        memory_bytes: this process's address-space limit, named in the error a MemoryError becomes.
    """

    def __init__(self, timeout: float, max_output_chars: int, memory_bytes: int):
        self.timeout = timeout
        self.max_output_chars = max_output_chars
        self.memory_bytes = memory_bytes
        self._env = sandbox_environment(max_output_chars)
        self._compiled: OrderedDict[str, jinja2.Template] = OrderedDict()

    def reply(self, request: dict) -> dict:
        """`{"text": ...}`, or `{"error": kind, "message": ...}` with kind one of syntax, timeout,
        too_large, memory, rejected, runtime. Runs in the main thread (the deadline is SIGALRM)."""
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            return self._outcome(request)
        except _RenderDeadline:
            return self.timed_out()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def timed_out(self) -> dict:
        return {"error": "timeout", "message": f"rendering took longer than {self.timeout:g} s"}

    def _outcome(self, request: dict) -> dict:
        try:
            return {"text": self._render(**request)}
        except TemplateSyntaxError as exc:
            return {"error": "syntax", "message": f"syntax error on line {exc.lineno}: {_cut(exc.message)}"}
        except TemplateRejected as exc:
            return {"error": "rejected", "message": _cut(str(exc))}
        except ValueTooLarge as exc:
            line = _line(exc)
            return {"error": "too_large", "message": _cut(str(exc)) + ("" if line is None else f" (line {line})")}
        except MemoryError:
            return {"error": "memory", "message": f"MemoryError: it needs more than {self.memory_bytes >> 20} MiB"}
        except Exception as exc:
            line = _line(exc)
            where = "" if line is None else f" on line {line}"
            return {"error": "runtime", "message": f"{type(exc).__name__}{where}: {_cut(str(exc))}"}

    def _render(
        self, template: str, messages: list, add_generation_prompt: bool, special_tokens: dict, tools: list | None = None
    ) -> str:
        compiled = self._compile(template)
        # the variables transformers passes: its special tokens, then these four
        stream = compiled.generate(
            **special_tokens,
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
        parts, size = [], 0
        try:
            for part in stream:
                size += len(part)
                if size > self.max_output_chars:
                    raise ValueTooLarge(f"the rendered prompt is longer than {self.max_output_chars} characters")
                parts.append(part)
        finally:
            stream.close()
        return "".join(parts)

    def _compile(self, template: str) -> jinja2.Template:
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._env.from_string(template)
            self._compiled[template] = compiled
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(template)
        return compiled


def _deadline_passed(signum, frame):
    raise _RenderDeadline()


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def _line(exc: BaseException) -> int | None:
    """The innermost template line in `exc`'s traceback, if any."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _limit_memory(memory_bytes: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main(argv: list[str] | None = None) -> None:
    """The worker: requests on stdin, replies on stdout, until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--max-output-chars", type=int, required=True)
    parser.add_argument("--memory-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    _limit_memory(args.memory_bytes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it closes our stdin
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # a stray print goes to the log, never into a frame
    signal.signal(signal.SIGALRM, _deadline_passed)
    worker = TemplateWorker(args.timeout, args.max_output_chars, args.memory_bytes)
    _write_frame(replies, {"ready": True})
    while (request := _read_frame(requests)) is not None:
        try:
            reply = worker.reply(request)
        except _RenderDeadline:  # the alarm landed after the render, as it was being disarmed
            reply = worker.timed_out()
        _write_frame(replies, reply)


if __name__ == "__main__":
    sys.exit(main())

"""What a server's processes use, read from Linux's /proc, and a guard that stops them at a memory bound.

Owns: finding a process's children and a session's members (by scanning /proc/<pid>/stat: not
every kernel has /proc/<pid>/task/*/children, and psutil is no dependency), a process's command
line, its resident memory now (VmRSS) and at its peak (VmHWM), the memory the machine has
available, and `MemoryGuard`, which SIGKILLs a session whose resident memory passes a bound (this
machine has no swap: the kernel's OOM killer would pick a process of its own choosing). It must
not start processes or read anything but /proc.
"""

import os
import signal
import threading
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses


def _pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return [child for child in _pids() if (fields := _stat(child)) is not None and fields[0] != "Z" and int(fields[1]) == pid]


def session_members(session: int) -> list[int]:
    """The live processes of session `session` (a process started with `start_new_session` leads one of its pid)."""
    return [pid for pid in _pids() if (fields := _stat(pid)) is not None and fields[0] != "Z" and int(fields[3]) == session]


def command_line(pid: int) -> list[str]:
    """The arguments `pid` was started with; empty if it is gone."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def memory_bytes(pid: int, field: str = "VmHWM") -> int | None:
    """A memory line of /proc/<pid>/status in bytes: `VmHWM` (peak resident) or `VmRSS` (resident now); None if gone."""
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes: what can be allocated without swapping or the OOM killer."""
    for line in (PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def session_rss(session: int) -> int:
    """Resident bytes of every live process of `session` together."""
    return sum(memory_bytes(pid, "VmRSS") or 0 for pid in session_members(session))


class MemoryGuard:
    """While entered, SIGKILL session `session` as soon as its resident memory passes `bound` bytes.

    Args:
        session: the session to watch (a `ServerProcess`'s pid).
        bound: resident bytes of the whole session at which it is killed.
        interval: seconds between readings.
    """

    def __init__(self, session: int, bound: int, interval: float = 0.2):
        self.session, self.bound, self.interval = session, bound, interval
        self.tripped_at: int | None = None  # the session's resident bytes when it was killed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-guard", daemon=True)

    def __enter__(self) -> "MemoryGuard":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            resident = session_rss(self.session)
            if resident > self.bound:
                self.tripped_at = resident
                try:
                    os.killpg(self.session, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return

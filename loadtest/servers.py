"""Servers under test, as child processes: loraplex itself and the PEFT baselines (vLLM's command is
in vllm_server.py).

Owns: `ServerProcess` (start `python -m ...` in a session of its own, wait until `/health` answers
200, keep its log, stop it with SIGTERM then SIGKILL, and kill whatever it left running in its
session, such as vLLM's engine process), the two ways a start can fail (`ServerExited`,
`ServerTimeout`), the command lines of `loraplex serve` and of the baselines, a free port on
127.0.0.1, and reading histograms and counters from a server's `/metrics`. It must not drive load.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"


class ServerExited(RuntimeError):
    """The server exited before `/health` answered 200; the message ends with its log's tail."""


class ServerTimeout(RuntimeError):
    """`/health` did not answer 200 within the server's start-up bound; the server was stopped."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started as `python -m ...`, its output in a log file, stopped on exit.

    Args:
        name: what to call it in messages (and its log file).
        args: arguments after `python -m`.
        port: the port its arguments make it listen on.
        env: extra environment variables.
        startup_seconds: how long it may take to become healthy.
        python: the interpreter; another virtualenv's python runs a server that is no dependency of loraplex.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        port: int,
        env: dict[str, str] | None = None,
        startup_seconds: float = 600,
        python: Path | str = sys.executable,
    ):
        self.name = name
        self.url = f"http://{HOST}:{port}"
        self.log = Path(tempfile.mkstemp(prefix=f"{name.lower().replace(' ', '-')}-", suffix=".log")[1])
        self._log_file = self.log.open("w")
        self._process = subprocess.Popen(
            [str(python), "-m", *args],
            env={**os.environ, **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._startup_seconds = startup_seconds

    def __enter__(self) -> "ServerProcess":
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The server's process id, which is also its session's."""
        return self._process.pid

    def wait_ready(self) -> None:
        """Return once `/health` answers 200.

        Raises:
            ServerExited: the server exited first.
            ServerTimeout: not healthy within `startup_seconds`.
        """
        deadline = time.monotonic() + self._startup_seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                raise ServerExited(f"{self.name} exited with {self._process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerTimeout(f"{self.name} did not become healthy in {self._startup_seconds} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it after 60 s, then SIGKILL what is left of its session."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        try:
            os.killpg(self._process.pid, signal.SIGKILL)  # its session's id is its pid
        except ProcessLookupError:
            pass
        self._log_file.close()


def loraplex_args(model: Path, store: Path, port: int, device: str, dtype: str, max_loras: int, max_num_seqs: int) -> list[str]:
    """`loraplex serve` for benchmarking: the base served as `base`, no queue limit in the way."""
    return [
        "loraplex", "serve", "--model", str(model), "--adapters", str(store), "--served-model-name", "base",
        "--host", HOST, "--port", str(port), "--device", device, "--dtype", dtype, "--max-loras", str(max_loras),
        "--max-num-seqs", str(max_num_seqs), "--max-queue", "100000", "--drain-timeout", "5",
    ]  # fmt: skip


def baseline_args(kind: str, model: Path, adapters: Path, port: int, device: str, dtype: str, max_batch: int) -> list[str]:
    """A PEFT baseline server (`naive` or `mixed`) over the adapters under `adapters`."""
    return [
        "loadtest.baselines", kind, "--model", str(model), "--adapters", str(adapters), "--served-model-name", "base",
        "--host", HOST, "--port", str(port), "--device", device, "--dtype", dtype, "--max-batch", str(max_batch),
    ]  # fmt: skip


def scrape_histogram(url: str, name: str, **labels: str) -> list[tuple[float, float]]:
    """The (le, cumulative count) buckets of histogram `name` (summed over other labels) at `url/metrics`."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name != f"{name}_bucket":
                continue
            if any(sample.labels.get(key) != wanted for key, wanted in labels.items()):
                continue
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return sorted(buckets.items())


def scrape_counter(url: str, name: str, **labels: str) -> float | None:
    """Counter `name` (its `_total` sample, summed over other labels) at `url/metrics`; None when the server has none."""
    total = None
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == f"{name}_total" and all(sample.labels.get(key) == wanted for key, wanted in labels.items()):
                total = (total or 0.0) + sample.value
    return total


def histogram_delta(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """What a histogram gained between two scrapes."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def histogram_quantile(buckets: list[tuple[float, float]], quantile: float) -> float | None:
    """Prometheus' `histogram_quantile`: linear interpolation inside the bucket holding the rank."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound

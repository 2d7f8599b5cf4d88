"""vLLM as a server under test, run from the virtualenv that `loadtest/vllm_venv.sh` builds.

Owns: `VllmLaunch` (that virtualenv's python and the environment vLLM runs in), finding the
libraries vLLM's CPU build wants preloaded (tcmalloc from the system, Intel OpenMP's
`libiomp5.so` from the virtualenv's `lib`), and the `vllm.entrypoints.openai.api_server` arguments
that serve the base as `base` and every adapter by name, with LoRA enabled whatever the trace
asks for. vLLM is never imported here (it is no dependency of loraplex); the only process started
here asks the virtualenv's python for its prefix. It must not start servers (servers.py does).
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtest.servers import HOST

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
MODULE = "vllm.entrypoints.openai.api_server"


class VllmSetupError(RuntimeError):
    """The vLLM virtualenv cannot run the server: its python or a library to preload is missing."""


@dataclass(frozen=True)
class VllmLaunch:
    """How to start vLLM: the virtualenv's python and the environment added to the suite's.

    Args:
        python: the virtualenv's python.
        env: `LD_PRELOAD`, the KV cache size and OpenMP settings on a CPU; nothing on a GPU.
    """

    python: Path
    env: dict[str, str]


def venv_prefix(python: Path) -> Path:
    """`sys.prefix` of `python`: the virtualenv's root.

    Raises:
        VllmSetupError: `python` is missing or does not run.
    """
    if not python.is_file():
        raise VllmSetupError(f"--vllm-python {python} does not exist; build the virtualenv with loadtest/vllm_venv.sh")
    try:
        answer = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, timeout=60)
    except OSError as error:
        raise VllmSetupError(f"--vllm-python {python} does not run: {error}") from error
    if answer.returncode != 0:
        raise VllmSetupError(f"--vllm-python {python} does not run: {answer.stderr.strip()[-500:]}")
    return Path(answer.stdout.strip())


def preload_libraries(prefix: Path, tcmalloc: Path = TCMALLOC) -> list[Path]:
    """The libraries vLLM's CPU docs ask to preload, in `LD_PRELOAD` order.

    Args:
        prefix: the virtualenv's root; intel-openmp installs `lib/libiomp5.so` under it.
        tcmalloc: the system's tcmalloc.

    Raises:
        VllmSetupError: either library is missing, named with how to get it.
    """
    iomp = prefix / "lib" / "libiomp5.so"
    if not tcmalloc.is_file():
        raise VllmSetupError(f"{tcmalloc} is missing: install Debian's libtcmalloc-minimal4 (loadtest/vllm_venv.sh does)")
    if not iomp.is_file():
        raise VllmSetupError(
            f"{iomp} is missing: the virtualenv at {prefix} lacks intel-openmp; build it with loadtest/vllm_venv.sh"
        )
    return [tcmalloc, iomp]


def vllm_env(preload: list[Path], threads: int, kv_cache_gib: int) -> dict[str, str]:
    """vLLM's CPU environment: preloads, KV cache GiB, and the same OpenMP threads as the other servers.

    Threads are not pinned to cores (`nobind`): the load generator and the other servers share them.
    """
    return {
        "LD_PRELOAD": ":".join(str(path) for path in preload),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }


def vllm_launch(python: Path, device: str, threads: int, kv_cache_gib: int, tcmalloc: Path = TCMALLOC) -> VllmLaunch:
    """Check the virtualenv at `python` and say how to start vLLM from it.

    Raises:
        VllmSetupError: on a CPU, when the python does not run or a preload library is missing;
            on a GPU, when the python is missing.
    """
    if device != "cpu":
        if not python.is_file():
            raise VllmSetupError(f"--vllm-python {python} does not exist")
        return VllmLaunch(python, {})
    preload = preload_libraries(venv_prefix(python), tcmalloc)
    return VllmLaunch(python, vllm_env(preload, threads, kv_cache_gib))


def lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds adapters of `rank`."""
    fitting = [allowed for allowed in LORA_RANKS if allowed >= rank]
    if not fitting:
        raise VllmSetupError(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, not {rank}")
    return fitting[0]


def vllm_args(
    model: Path,
    adapters: dict[str, Path],
    port: int,
    dtype: str,
    max_model_len: int,
    max_num_seqs: int,
    max_loras: int,
    rank: int,
    gpu_memory: float | None = None,
) -> list[str]:
    """vLLM's OpenAI server for benchmarking: the base served as `base`, every adapter by name.

    Args:
        model: the base checkpoint.
        adapters: adapter directories by the name requests use.
        port: where it listens on 127.0.0.1.
        dtype: weights and activations.
        max_model_len: context length.
        max_num_seqs: its batch bound (the suite's concurrency).
        max_loras: adapters in one batch, as loraplex's device slots.
        rank: the adapters' rank.
        gpu_memory: `--gpu-memory-utilization` on a GPU; None on a CPU.
    """
    args = [
        MODULE, "--model", str(model), "--served-model-name", "base", "--host", HOST, "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
        "--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(lora_rank(rank)),
        "--max-cpu-loras", str(max(len(adapters), max_loras)), "--no-enable-prefix-caching",
    ]  # fmt: skip
    if gpu_memory is not None:
        args += ["--gpu-memory-utilization", str(gpu_memory)]
    return args + ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]

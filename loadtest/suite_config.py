"""What one run of the benchmark suite is: `SuiteConfig`, every setting with its default written once.

Owns: the suite's settings (model, device, load, the loraplex sweep, the compare phase, where
results go), what follows from them (the servers' environment and dtype, the BENCHMARKS.md
section name) and the seeded traces every phase draws (`SuiteConfig.trace`). It must not start,
build or measure anything.
"""

from dataclasses import dataclass
from pathlib import Path

from loadtest.trace import TraceConfig

ADAPTER_COUNTS = (1, 8, 64, 512)  # the loraplex sweep's N
ALPHAS = (0.0, 1.0)  # the loraplex sweep's popularity exponents
COMPARE_COUNTS = (0, 8, 64)  # the compare phase's N; the PEFT baselines run at the last only
COMPARE_ALPHA = 1.0


@dataclass(frozen=True)
class SuiteConfig:
    """Every setting of a suite run; `python -m loadtest.suite --help` shows them as flags.

    Args:
        model_config: a `MODEL_PRESETS` name, a config.json path or inline JSON.
        device: `cpu` or `cuda`.
        rank: the random adapters' LoRA rank.
        concurrency: closed-loop clients of every run (and every server's batch bound).
        requests: requests per run of the loraplex sweep.
        compare_requests: requests per run of the compare phase.
        rounds: rounds of the compare phase (each server measured at each N once per round).
        cold_adapters: never-seen adapters registered one by one for the cold starts.
        prompt_len: (min, max) prompt tokens of every run.
        output_len: (min, max) output tokens of the loraplex sweep.
        compare_output_len: (min, max) output tokens of the compare phase.
        max_seconds: the time bound of each run.
        max_loras: device adapter slots of loraplex (`--max-loras`) and of vLLM (`--max-loras`).
        server_threads: torch / OpenMP threads of each server on a CPU.
        seed: seeds the checkpoint, the adapters and every trace.
        adapter_counts: the loraplex sweep's N.
        vllm_python: the python of the virtualenv `loadtest/vllm_venv.sh` builds; None leaves vLLM out.
        vllm_kv_cache_gib: vLLM's CPU KV cache (`VLLM_CPU_KVCACHE_SPACE`).
        vllm_gpu_memory: vLLM's `--gpu-memory-utilization` on a GPU, which it shares with the other servers.
        peft_baselines: run the PEFT baselines in the compare phase (one request at a time is
            very slow on a large base; the ratios against them are then left blank).
        out: plots and per-run files.
        benchmarks_md: the Markdown file whose section the suite writes.
    """

    model_config: str = "tiny"
    device: str = "cpu"
    rank: int = 16
    concurrency: int = 32
    requests: int = 384
    compare_requests: int = 128
    rounds: int = 3
    cold_adapters: int = 32
    prompt_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (16, 64)
    compare_output_len: tuple[int, int] = (32, 64)
    max_seconds: float = 240.0
    max_loras: int = 32
    server_threads: int = 1
    seed: int = 0
    adapter_counts: tuple[int, ...] = ADAPTER_COUNTS
    vllm_python: Path | None = None
    vllm_kv_cache_gib: int = 2
    vllm_gpu_memory: float = 0.3
    peft_baselines: bool = True
    out: Path = Path("benchmarks")
    benchmarks_md: Path = Path("BENCHMARKS.md")

    @property
    def server_env(self) -> dict[str, str]:
        """Every server gets the same torch intra-op threads, so the load generator keeps a core."""
        return {"OMP_NUM_THREADS": str(self.server_threads)} if self.device == "cpu" else {}

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def section(self) -> str:
        return f"{self.device}-{self.model_config}" if len(self.model_config) < 40 else f"{self.device}-custom"

    @property
    def max_positions(self) -> int:
        """The checkpoint's context: the longest prompt and output of any phase, and a margin."""
        return self.prompt_len[1] + max(self.output_len[1], self.compare_output_len[1]) + 16

    @property
    def store_adapters(self) -> int:
        """Adapters the workspace builds: enough for the sweep's largest N and the compare phase's."""
        return max(*self.adapter_counts, *COMPARE_COUNTS)

    def trace(self, num_adapters: int, alpha: float, requests: int, seed: int = 0, compare: bool = False) -> TraceConfig:
        """The suite's trace over `lora-0` ... `lora-{num_adapters - 1}` (the base only for 0).

        Args:
            num_adapters: adapters to spread requests over.
            alpha: their power-law popularity exponent.
            requests: the trace's length.
            seed: added to the suite's seed; traces of one seed ask for the same prompts and lengths.
            compare: draw outputs from `compare_output_len` instead of `output_len`.
        """
        return TraceConfig(
            num_requests=requests,
            adapters=tuple(f"lora-{index}" for index in range(num_adapters)),
            alpha=alpha,
            prompt_len=self.prompt_len,
            output_len=self.compare_output_len if compare else self.output_len,
            token_ids=(10, 256),
            seed=self.seed + seed,
        )

"""Shared fixtures: tiny checkpoints and adapters on disk, and PEFT as the reference to match."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under Triton's interpreter (on CPU tensors). It must be on
# before anything imports triton: transformers does, through torch._dynamo, just below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from tiny import make_adapter, make_model

# One torch intra-op thread unless OMP_NUM_THREADS says otherwise, here and in every subprocess
# (serve, the CLI): the tiny models gain nothing from more, and on a shared 2-core machine OpenMP
# threads spin-waiting for a descheduled peer made the demo's scoring 3-13x slower (the 600 s
# timeout of a loaded CI run).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Adapters that differ in rank, targets and scaling rules, as tenants' adapters do.
ADAPTER_SPECS = {
    "r4-qv": dict(rank=4, targets=("q_proj", "v_proj"), seed=1),
    "r8-attn": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2),
    "r16-mlp": dict(rank=16, targets=("gate_proj", "up_proj", "down_proj"), seed=3),
    "r8-all-rslora": dict(
        rank=8,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        seed=4,
        alpha=12,
        use_rslora=True,
    ),
    "r4-patterns": dict(
        rank=4,
        targets=("q_proj", "o_proj", "down_proj"),
        seed=5,
        rank_pattern={"down_proj": 16},
        alpha_pattern={"o_proj": 3},
    ),
}


def require_promtool() -> str:
    """promtool's path; skips without it, unless LORAPLEX_REQUIRE_PROMTOOL=1 (CI), which fails."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("LORAPLEX_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not on PATH, and LORAPLEX_REQUIRE_PROMTOOL=1 requires it")
        pytest.skip("promtool is not on PATH (install the prometheus package to run this check)")
    return promtool


# Every metric the server must expose, as the spec names them (the exposition is checked against it).
METRIC_NAMES = (
    "loraplex_requests_total",
    "loraplex_prompt_tokens_total",
    "loraplex_generation_tokens_total",
    "loraplex_tenant_tokens_total",
    "loraplex_adapter_loads_total",
    "loraplex_adapter_evictions_total",
    "loraplex_adapter_cache_lookups_total",
    "loraplex_adapter_cache_hits_total",
    "loraplex_time_to_first_token_seconds",
    "loraplex_inter_token_latency_seconds",
    "loraplex_e2e_request_latency_seconds",
    "loraplex_request_queue_time_seconds",
    "loraplex_batch_size",
    "loraplex_adapter_load_seconds",
    "loraplex_adapter_register_seconds",
    "loraplex_num_requests_running",
    "loraplex_num_requests_waiting",
    "loraplex_kv_cache_usage_ratio",
    "loraplex_adapter_slots_used",
    "loraplex_adapter_slots_total",
    "loraplex_lora_requests_info",
    "loraplex_prefix_cache_queries_total",
    "loraplex_prefix_cache_hits_total",
)


@dataclass
class TinySetup:
    model_dir: Path
    adapter_dirs: dict[str, Path]


def build_setup(root: Path, arch: str, seed: int, **model_fields) -> TinySetup:
    """A tiny `arch` checkpoint (`model_fields` override its config) with every adapter of ADAPTER_SPECS."""
    model_dir = make_model(root / f"{arch}-base", arch, seed=seed, **model_fields)
    adapters = {
        name: make_adapter(model_dir, root / f"{arch}-{name}", **spec) for name, spec in ADAPTER_SPECS.items()
    }
    return TinySetup(model_dir, adapters)


@pytest.fixture(scope="session")
def tiny_setups(tmp_path_factory) -> dict[str, TinySetup]:
    """One tiny checkpoint per architecture, each with every adapter of ADAPTER_SPECS."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_setup(root, arch, seed) for seed, arch in enumerate(("llama", "mistral", "qwen2", "qwen3"))}


@pytest.fixture(scope="session")
def llama(tiny_setups) -> TinySetup:
    return tiny_setups["llama"]


@pytest.fixture(scope="session")
def tokenizer(llama):
    """The tiny llama's tokenizer, as the server loads it."""
    return AutoTokenizer.from_pretrained(llama.model_dir)


def quantization_config(quantize: str) -> BitsAndBytesConfig | None:
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


class PeftOracle:
    """PEFT's own `generate`, one request at a time with its adapter: the reference outputs."""

    def __init__(self, setup: TinySetup, quantize: str = "none", device: str = "cpu", dtype: torch.dtype = torch.float32):
        quantization = quantization_config(quantize)
        base = AutoModelForCausalLM.from_pretrained(
            setup.model_dir, dtype=dtype, quantization_config=quantization, device_map=device if quantization is not None else None
        )
        if quantization is None:
            base.to(device)  # bitsandbytes' layers refuse `.to`: device_map placed them
        self.device = device
        names = list(setup.adapter_dirs)
        self.model = PeftModel.from_pretrained(base, setup.adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(setup.adapter_dirs[name], adapter_name=name)
        self.model.eval()
        # Generate exactly max_new_tokens, as the engine does with ignore_eos: no EOS stopping, and
        # no min_new_tokens either, since that edits the logits.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 2

    def prompt_scores(self, prompt: list[int], adapter: str | None) -> torch.Tensor:
        """[T, V] log-probabilities of every next token after each prompt position, one forward."""
        inputs = torch.tensor([prompt], device=self.device)
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    logits = self.model(input_ids=inputs).logits[0]
            else:
                self.model.set_adapter(adapter)
                logits = self.model(input_ids=inputs).logits[0]
        return logits.float().log_softmax(-1).cpu()

    def prompt_logprobs(self, prompt: list[int], adapter: str | None) -> list[float]:
        """Each prompt token's log-probability given the tokens before it (from the second token on)."""
        scores = self.prompt_scores(prompt, adapter)
        return [scores[i - 1, prompt[i]].item() for i in range(1, len(prompt))]

    def generate(self, prompt: list[int], adapter: str | None, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the [n, V] logits that chose them."""
        inputs = torch.tensor([prompt], device=self.device)
        kwargs = dict(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    out = self.model.generate(**kwargs)
            else:
                self.model.set_adapter(adapter)
                out = self.model.generate(**kwargs)
        tokens = out.sequences[0, len(prompt) :].tolist()
        return tokens, torch.cat(out.logits).float().cpu()


@pytest.fixture(scope="session")
def oracle(llama) -> PeftOracle:
    """PEFT over the tiny llama with every test adapter, in float32."""
    return PeftOracle(llama)

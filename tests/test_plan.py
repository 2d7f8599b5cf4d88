"""The memory planner against reality: loaded models, bitsandbytes storage, the engine's tensors, PEFT."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import quantization_config
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.lora_layer import TARGET_NAMES
from loraplex.plan import GIB, format_bytes, format_count, plan_memory
from tiny import make_adapter, make_model

# name: (architecture, config overrides); each variant exercises one way the parameter count can go wrong.
VARIANTS = {
    "llama": ("llama", {}),
    "llama-biased": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-odd": ("llama", dict(hidden_size=48, intermediate_size=50)),  # widths off the nf4 block of 64
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
}

LLAMA3_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    return {name: make_model(root / name, arch, seed=1, **overrides) for name, (arch, overrides) in VARIANTS.items()}


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct weight storage: parameters (packed when quantized) and bitsandbytes statistics.

    Buffers are left out: the only ones are rotary `inv_freq` tables, which are not weights.
    """
    tensors = {}
    for param in model.parameters():
        extras = [value for value in vars(param).values() if isinstance(value, torch.Tensor)]  # Int8Params: CB, SCB
        quant_state = getattr(param, "quant_state", None)  # Params4bit: absmax, code
        if quant_state is not None:
            extras += [value for value in vars(quant_state).values() if isinstance(value, torch.Tensor)]
        for tensor in (param, *extras):
            tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(tensors.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_base_weight_bytes_equal_the_loaded_models_parameters(models, variant, dtype):
    model = AutoModelForCausalLM.from_pretrained(models[variant], dtype=getattr(torch, dtype))
    plan = plan_memory(models[variant], dtype=dtype)
    assert plan.base_weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("variant", ["llama-odd", "qwen2", "qwen3-tied"])
def test_quantized_base_weight_bytes_equal_bitsandbytes_storage(models, variant, quantize):
    model = AutoModelForCausalLM.from_pretrained(
        models[variant], dtype=torch.float32, quantization_config=quantization_config(quantize), device_map="cpu"
    )
    plan = plan_memory(models[variant], quantize=quantize, dtype="float32")
    assert plan.base_weight_bytes == stored_bytes(model)


# (variant, dtype, max_model_len, num_kv_blocks): a length off the block size, the default length, explicit blocks.
ENGINE_CASES = [
    ("llama", "float32", 100, None),
    ("qwen3", "bfloat16", None, None),
    ("qwen2", "float32", 64, 7),
]


@pytest.fixture(scope="module", params=ENGINE_CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def engine_and_plan(request, models):
    variant, dtype, max_model_len, num_kv_blocks = request.param
    settings = dict(dtype=dtype, max_loras=3, max_lora_rank=8, max_model_len=max_model_len, max_num_seqs=5, num_kv_blocks=num_kv_blocks)
    engine = Engine(EngineConfig(model=str(models[variant]), device="cpu", **settings))
    return engine, plan_memory(models[variant], adapter_rank=8, **settings)


def test_kv_cache_bytes_equal_the_engines_cache(engine_and_plan):
    engine, plan = engine_and_plan
    cache = engine.kv_cache
    assert plan.max_model_len == engine.max_model_len
    assert plan.num_kv_blocks == cache.allocator.num_blocks
    assert plan.kv_cache_bytes == sum(t.numel() * t.element_size() for t in cache.keys + cache.values)


def test_slot_bytes_equal_the_engines_lora_stacks(engine_and_plan):
    engine, plan = engine_and_plan
    stacks = [t for wrapper in engine.wrappers.values() for t in (wrapper.lora_a, wrapper.lora_b)]
    assert plan.slot_bytes == sum(t.numel() * t.element_size() for t in stacks)


def test_adapter_host_bytes_equal_a_loaded_adapters_nbytes(engine_and_plan, tmp_path):
    engine, plan = engine_and_plan
    adapter_dir = make_adapter(Path(engine.config.model), tmp_path / "adapter", rank=plan.adapter_rank, targets=TARGET_NAMES)
    adapter = engine.load_adapter("all-projections", adapter_dir)
    assert plan.adapter_host_bytes == adapter.nbytes
    assert plan.adapters_per_gib == GIB // adapter.nbytes


@pytest.mark.parametrize("variant", ["llama-biased", "qwen2", "qwen3-tied"])
def test_lora_and_full_parameter_counts_equal_peft(models, variant):
    model = AutoModelForCausalLM.from_pretrained(models[variant], dtype=torch.float32)
    full = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(TARGET_NAMES)))
    trainable, total = peft_model.get_nb_trainable_parameters()
    plan = plan_memory(models[variant], adapter_rank=4)
    assert plan.lora_parameters == trainable
    assert plan.num_parameters == full == total - trainable


def test_training_bytes_use_sixteen_bytes_per_trained_parameter(models):
    plan = plan_memory(models["llama"], quantize="nf4")
    assert plan.full_finetune_bytes == 16 * plan.num_parameters
    assert plan.lora_finetune_bytes == plan.base_weight_bytes + 16 * plan.lora_parameters


def test_a_llama3_8b_config_gives_its_published_figures(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(LLAMA3_8B))
    plan = plan_memory(config_file, dtype="bfloat16", adapter_rank=16)
    assert plan.num_parameters == 8_030_261_248
    assert plan.base_weight_bytes == 2 * 8_030_261_248
    assert plan.kv_bytes_per_token == 128 * 1024
    assert plan.max_model_len == 4096  # min(max_position_embeddings, 4096), as the engine
    assert plan.lora_parameters == 41_943_040


def test_a_config_file_plans_like_its_directory(models):
    assert plan_memory(models["qwen3"] / "config.json") == plan_memory(models["qwen3"])


def test_auto_dtype_plans_for_cuda_in_bfloat16(models):
    assert plan_memory(models["llama"], dtype="auto") == plan_memory(models["llama"], dtype="bfloat16")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_input, settings, message",
    [
        (lambda tmp: tmp / "missing", {}, "does not exist"),
        (lambda tmp: tmp, {}, "config.json is missing"),
        (lambda tmp: _write(tmp / "config.json", "{not json"), {}, "not valid JSON"),
        (lambda tmp: _write(tmp / "config.json", '{"model_type": "gpt2"}'), {}, "model_type 'gpt2' is not supported"),
        (lambda tmp: _write(tmp / "config.json", "[]"), {}, "model_type None is not supported"),
        (lambda tmp: _write(tmp / "config.json", json.dumps(LLAMA3_8B)), dict(adapter_rank=128), "adapter_rank 128"),
        (lambda tmp: _write(tmp / "config.json", json.dumps(LLAMA3_8B)), dict(max_loras=0), "max_loras"),
    ],
    ids=["missing-path", "no-config", "bad-json", "unsupported-type", "not-an-object", "rank-over-slots", "no-slots"],
)
def test_bad_input_raises_a_value_error_naming_the_problem(tmp_path, make_input, settings, message):
    with pytest.raises(ValueError, match=message):
        plan_memory(make_input(tmp_path), **settings)


def test_the_report_has_one_row_per_figure(models):
    plan = plan_memory(models["llama"], quantize="nf4")
    rows = plan.to_table()
    assert [label for label, _ in rows] == [
        "model",
        "parameters",
        "base weights",
        "KV cache",
        "adapter slots",
        "device total",
        "host memory per adapter",
        "full finetune (Adam)",
        "QLoRA finetune (Adam)",
        "training note",
    ]
    assert plan.render().splitlines()[2].startswith("base weights")
    assert format_bytes(plan.kv_cache_bytes) in dict(rows)["KV cache"]


@pytest.mark.parametrize(
    "size, text",
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 << 20, "3.0 MiB"), (16_060_522_496, "14.96 GiB")],
)
def test_format_bytes_uses_binary_units(size, text):
    assert format_bytes(size) == text


@pytest.mark.parametrize(
    "count, text",
    [(64, "64"), (123_456, "123.5 K"), (41_943_040, "41.9 M"), (8_030_261_248, "8.03 B")],
)
def test_format_count_uses_decimal_units(count, text):
    assert format_count(count) == text

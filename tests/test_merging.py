"""Adapter merging gives peft's `add_weighted_adapter` result, method by method, and what it is in terms of deltas.

The oracle is peft itself: the same adapters loaded in a PeftModel, merged with the same weights,
density and seed (`torch.manual_seed(seed)` first), each module's `get_delta_weight` compared with
B @ A * scaling of our merged adapter. Every method but svd matches bit for bit; svd factors the
low-rank sum instead of decomposing the dense delta, and lands closer to the float64 truth than peft.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.lora_layer import TARGET_NAMES
from loraplex.engine.request import SamplingParams
from loraplex.errors import AdapterInvalid, RequestInvalid
from loraplex.lora.adapter import ModuleShape, build_adapter, read_adapter_dir
from loraplex.merging import MERGE_METHODS, merge_adapters, model_order
from tiny import ARCHITECTURES, VOCAB_SIZE, make_adapter, make_model

# Ranks 8 and 4 (and 4-with-patterns); overlapping and disjoint targets; three scaling rules; four inits.
SPECS = {
    "a": dict(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=11),
    "b": dict(rank=8, targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), seed=12, alpha=8),
    "c": dict(rank=4, targets=("q_proj", "v_proj"), seed=13),
    "rs": dict(rank=8, targets=("q_proj", "v_proj"), seed=14, alpha=6, use_rslora=True),
    "pat": dict(rank=4, targets=("q_proj", "o_proj", "down_proj"), seed=15, rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 3}),
    # Other `init_lora_weights`: peft's random draws while creating a merged adapter depend on the first one's.
    "gauss": dict(rank=8, targets=("q_proj", "o_proj"), seed=16, init_lora_weights="gaussian"),
    "off": dict(rank=8, targets=("v_proj", "up_proj"), seed=17, init_lora_weights=False),
    "eva": dict(rank=8, targets=("k_proj",), seed=18, init_lora_weights="eva"),
}
SVD_TOL = 5e-6  # relative, per module: peft's float32 dense SVD is itself ~1e-6 off the float64 truth


@dataclass
class Setup:
    model_dir: Path
    adapter_dirs: dict[str, Path]
    shapes: dict[str, ModuleShape]
    peft: PeftModel  # the base with every adapter of SPECS loaded


def build_setup(root: Path, specs: dict, **model_fields) -> Setup:
    model_dir = make_model(root / "base", **model_fields)
    adapter_dirs = {name: make_adapter(model_dir, root / name, **spec) for name, spec in specs.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shapes = {
        name: ModuleShape(module.in_features, module.out_features)
        for name, module in base.named_modules()
        if name.rsplit(".", 1)[-1] in TARGET_NAMES
    }
    first, *others = specs
    peft = PeftModel.from_pretrained(base, adapter_dirs[first], adapter_name=first)
    for name in others:
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    return Setup(model_dir, adapter_dirs, shapes, peft)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("merging"), SPECS)


def merge(setup: Setup, names: list[str], weights: list[float], method: str, **options):
    return merge_adapters([read_adapter_dir(setup.adapter_dirs[name]) for name in names], weights, method, setup.shapes, **options)


def peft_merge(setup: Setup, names, weights, method, density=None, rank=None, seed=0) -> dict[str, torch.Tensor]:
    """peft's merged adapter, as each module's delta."""
    merged = f"merged-{len(setup.peft.peft_config)}"
    torch.manual_seed(seed)
    setup.peft.add_weighted_adapter(names, weights, merged, combination_type=method, svd_rank=rank, density=density)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight(merged)
        for name, module in setup.peft.named_modules()
        if isinstance(module, LoraLayer) and merged in module.lora_A
    }


def peft_rank(setup: Setup) -> int:
    """The rank of peft's latest merged adapter."""
    return setup.peft.peft_config[f"merged-{len(setup.peft.peft_config) - 1}"].r


def deltas(setup: Setup, config: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """B @ A * scaling per module, read back through loraplex's own validator."""
    adapter = build_adapter("merged", config, tensors, setup.shapes, max_rank=64, dtype=torch.float32)
    return {module: (lora.lora_b @ lora.lora_a) * lora.scaling for module, lora in adapter.modules.items()}


def weighted_sum(setup: Setup, names, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i per module, over the adapters that target it."""
    total: dict[str, torch.Tensor] = {}
    for name, weight in zip(names, weights):
        for module, delta in deltas(setup, *read_adapter_dir(setup.adapter_dirs[name])).items():
            total[module] = total.get(module, 0) + weight * delta
    return total


def worst_relative_error(ours: dict, reference: dict) -> float:
    assert ours.keys() == reference.keys()
    return max(((ours[m] - reference[m]).norm() / reference[m].norm()).item() for m in reference)


# (method, adapters, weights, options): unequal ranks for cat/svd, rank_pattern, rsLoRA, negative weights.
PEFT_CASES = [
    ("linear", ["a", "b"], [0.7, 0.4], {}),
    ("linear", ["a", "b"], [1.0, -0.5], {}),
    ("linear", ["a", "rs"], [0.5, 0.5], {}),
    ("cat", ["a", "c"], [0.6, 1.2], {}),
    ("cat", ["a", "pat", "rs"], [0.6, 1.2, -0.3], {}),
    ("svd", ["a", "c"], [0.6, 1.2], {}),
    ("svd", ["a", "c", "pat"], [0.6, 1.2, -0.3], {"rank": 5}),
    ("ties", ["a", "b"], [0.7, 0.4], {"density": 0.5}),
    ("ties", ["a", "b", "rs"], [0.7, -0.4, 0.9], {"density": 0.3}),
    ("dare_linear", ["a", "b"], [0.7, 0.4], {"density": 0.6, "seed": 3}),
    ("dare_linear", ["a", "b", "rs"], [1.0, 1.0, -0.5], {"density": 0.25, "seed": 0}),
    ("dare_ties", ["a", "b", "rs"], [0.7, 0.4, 0.9], {"density": 0.4, "seed": 7}),
    ("dare_ties", ["gauss", "a"], [0.5, 1.0], {"density": 0.7, "seed": 2}),
    ("dare_linear", ["off", "b"], [0.5, 1.0], {"density": 0.5, "seed": 4}),
    ("dare_linear", ["eva", "a", "b"], [0.5, 1.0, 0.2], {"density": 0.5, "seed": 5}),
]


@pytest.mark.parametrize("method, names, weights, options", PEFT_CASES, ids=[f"{c[0]}-{'+'.join(c[1])}" for c in PEFT_CASES])
def test_merge_equals_peft_add_weighted_adapter(setup, method, names, weights, options):
    config, tensors = merge(setup, names, weights, method, **options)
    ours, theirs = deltas(setup, config, tensors), peft_merge(setup, names, weights, method, **options)
    assert ours.keys() == theirs.keys()
    if method == "svd":
        assert worst_relative_error(ours, theirs) <= SVD_TOL
    else:
        assert all(torch.equal(ours[m], theirs[m]) for m in theirs), "not bit-identical to peft"
    assert config["r"] == config["lora_alpha"] == peft_rank(setup)


def test_every_method_is_compared_with_peft():
    assert {case[0] for case in PEFT_CASES} == set(MERGE_METHODS)


def test_cat_delta_is_the_weighted_sum_of_the_deltas(setup):
    names, weights = ["a", "c", "pat"], [0.6, 1.2, -0.3]
    config, tensors = merge(setup, names, weights, "cat")
    assert config["r"] == 8 + 4 + 8  # pat counts as 8: peft takes the largest of r and rank_pattern
    assert worst_relative_error(deltas(setup, config, tensors), weighted_sum(setup, names, weights)) <= 1e-6


def test_svd_is_the_best_low_rank_approximation_of_the_weighted_sum(setup):
    names, weights = ["a", "c"], [0.6, 1.2]
    full = merge(setup, names, weights, "svd", rank=12)  # rank 8 + 4 holds the sum exactly
    assert worst_relative_error(deltas(setup, *full), weighted_sum(setup, names, weights)) <= 1e-6
    truncated = deltas(setup, *merge(setup, names, weights, "svd"))  # default: the largest rank, 8
    best = {}
    for module, delta in weighted_sum(setup, names, weights).items():
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best[module] = ((u[:, :8] * s[:8]) @ vh[:8]).float()
    assert worst_relative_error(truncated, best) <= 1e-6


def test_linear_is_the_weighted_sum_where_one_adapter_targets_the_module(setup):
    names, weights = ["a", "b"], [0.7, 0.4]  # k_proj, o_proj only in a; gate/up/down only in b
    ours, expected = deltas(setup, *merge(setup, names, weights, "linear")), weighted_sum(setup, names, weights)
    alone = [m for m in expected if m.rsplit(".", 1)[-1] not in ("q_proj", "v_proj")]
    assert worst_relative_error({m: ours[m] for m in alone}, {m: expected[m] for m in alone}) <= 1e-6


def test_linear_adds_cross_terms_where_adapters_share_the_module(setup):
    """B @ A = (sum_i sqrt|w_i s_i| B_i) @ (sum_j sign(w_j) sqrt|w_j s_j| A_j): w_i D_i plus B_i @ A_j terms."""
    names, weights = ["a", "b"], [0.7, -0.4]
    ours, expected = deltas(setup, *merge(setup, names, weights, "linear")), weighted_sum(setup, names, weights)
    (config_a, tensors_a), (config_b, tensors_b) = (read_adapter_dir(setup.adapter_dirs[n]) for n in names)
    a = build_adapter("a", config_a, tensors_a, setup.shapes, 64, torch.float32).modules
    b = build_adapter("b", config_b, tensors_b, setup.shapes, 64, torch.float32).modules
    for module in (m for m in expected if m.rsplit(".", 1)[-1] in ("q_proj", "v_proj")):
        root = math.sqrt(abs(weights[0] * a[module].scaling * weights[1] * b[module].scaling))
        cross = root * (-(a[module].lora_b @ b[module].lora_a) + b[module].lora_b @ a[module].lora_a)
        torch.testing.assert_close(ours[module], expected[module] + cross, rtol=1e-5, atol=1e-5)
        assert (ours[module] - expected[module]).norm() > 0.1 * expected[module].norm()


def test_linear_of_an_adapter_with_itself_doubles_it_where_the_weighted_sum_keeps_it(setup):
    ours = deltas(setup, *merge(setup, ["a", "a"], [0.5, 0.5], "linear"))  # (sqrt(.5) + sqrt(.5))^2 = 2
    single = weighted_sum(setup, ["a"], [1.0])
    assert worst_relative_error(ours, {m: 2 * d for m, d in single.items()}) <= 1e-6


def test_dare_matches_peft_when_a_gaussian_init_draws_differently_from_a_uniform_one(tmp_path):
    """normal_ draws like uniform_ when numel % 16 == 0; down_proj's A here is [3, 100], so they differ."""
    specs = {
        "gauss": dict(rank=3, targets=("q_proj", "down_proj"), seed=21, init_lora_weights="gaussian"),
        "plain": dict(rank=3, targets=("down_proj",), seed=22),
    }
    odd = build_setup(tmp_path, specs, intermediate_size=100)
    for method in ("dare_linear", "dare_ties"):
        ours = deltas(odd, *merge(odd, list(specs), [0.6, 0.9], method, density=0.5, seed=9))
        theirs = peft_merge(odd, list(specs), [0.6, 0.9], method, density=0.5, seed=9)
        assert all(torch.equal(ours[m], theirs[m]) for m in theirs)


def test_dare_depends_on_the_seed_alone_and_leaves_the_global_rng_alone(setup):
    options = dict(density=0.5, seed=5)
    state = torch.get_rng_state()
    first = merge(setup, ["a", "b"], [1.0, 1.0], "dare_ties", **options)[1]
    assert torch.equal(torch.get_rng_state(), state)
    again = merge(setup, ["a", "b"], [1.0, 1.0], "dare_ties", **options)[1]
    other = merge(setup, ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=6)[1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("dare, plain, options", [("dare_linear", "linear", {}), ("dare_ties", "ties", {"density": 1.0})])
def test_dare_at_density_one_prunes_nothing(setup, dare, plain, options):
    pruned = merge(setup, ["a", "b"], [0.7, 0.4], dare, density=1.0)[1]
    unpruned = merge(setup, ["a", "b"], [0.7, 0.4], plain, **options)[1]
    assert all(torch.equal(pruned[k], unpruned[k]) for k in unpruned)


def test_merged_config_is_the_first_adapters_with_the_union_of_targets(setup):
    config, _ = merge(setup, ["rs", "pat", "b"], [1.0, 1.0, 1.0], "cat")
    first = read_adapter_dir(setup.adapter_dirs["rs"])[0]
    assert config["r"] == config["lora_alpha"] == 8 + 8 + 8
    assert config["target_modules"] == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["rank_pattern"] == config["alpha_pattern"] == {} and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == first["base_model_name_or_path"]


def test_an_rslora_first_adapter_keeps_scaling_one_where_peft_scales_by_sqrt_r(setup):
    """peft 0.21 copies use_rslora=true into a config with lora_alpha = r: its merge is sqrt(r) too large."""
    names, weights = ["rs", "a"], [1.0, 1.0]
    config, tensors = merge(setup, names, weights, "cat")
    ours = deltas(setup, config, tensors)
    assert worst_relative_error(ours, weighted_sum(setup, names, weights)) <= 1e-6
    theirs = peft_merge(setup, names, weights, "cat")
    assert worst_relative_error({m: d * math.sqrt(config["r"]) for m, d in ours.items()}, theirs) <= 1e-6


B_AS_A_REGEX = r".*\.(q_proj|v_proj|gate_proj|up_proj|down_proj)"  # adapter b's own targets, as one regex


def spoil(index: int, **fields):
    def edit(adapters):
        adapters[index][0].update(fields)

    return edit


# (method, adapters, weights, options, edit of the read adapters, error, param, message fragment)
REFUSALS = [
    ("linear", ["a"], [1.0], {}, None, RequestInvalid, "adapters", "at least 2 adapters, got 1"),
    ("linear", ["a", "b"], [1.0], {}, None, RequestInvalid, "weights", "got 1 weights for 2 adapters"),
    ("linear", ["a", "b"], [1.0, float("nan")], {}, None, RequestInvalid, "weights", "finite numbers"),
    ("average", ["a", "b"], [1.0, 1.0], {}, None, RequestInvalid, "method", "unknown merge method 'average'"),
    ("ties", ["a", "b"], [1.0, 1.0], {}, None, RequestInvalid, "density", "'ties' needs a density in (0, 1]"),
    ("dare_linear", ["a", "b"], [1.0, 1.0], {"density": 0.0}, None, RequestInvalid, "density", "in (0, 1], got 0.0"),
    ("dare_ties", ["a", "b"], [1.0, 1.0], {"density": 1.5}, None, RequestInvalid, "density", "in (0, 1], got 1.5"),
    ("cat", ["a", "b"], [1.0, 1.0], {"density": 0.5}, None, RequestInvalid, "density", "not to 'cat'"),
    ("linear", ["a", "b"], [1.0, 1.0], {"rank": 4}, None, RequestInvalid, "rank", "rank applies to svd only"),
    ("svd", ["a", "b"], [1.0, 1.0], {"rank": 0}, None, RequestInvalid, "rank", "positive integer, got 0"),
    ("svd", ["a", "b"], [1.0, 1.0], {"rank": 40}, None, RequestInvalid, "rank", "svd rank 40 exceeds 32"),
    ("dare_ties", ["a", "b"], [1.0, 1.0], {"density": 0.5, "seed": "1"}, None, RequestInvalid, "seed", "integer"),
    ("linear", ["a", "c"], [1.0, 1.0], {}, None, RequestInvalid, "adapters", "equal rank, got ranks [8, 4]; merge"),
    ("dare_ties", ["c", "b"], [1.0, 1.0], {"density": 0.5}, None, RequestInvalid, "adapters", "with 'cat' (exact, rank 12) or 'svd'"),
    ("ties", ["a", "pat"], [1.0, 1.0], {"density": 0.5}, None, RequestInvalid, "adapters", "at rank 4 (its rank_pattern"),
    ("cat", ["a", "b"], [1.0, 1.0], {}, spoil(1, target_modules=B_AS_A_REGEX), RequestInvalid, "adapters", "regex string"),
    ("cat", ["a", "b"], [1.0, 1.0], {}, spoil(0, layers_to_transform=[0, 1]), RequestInvalid, "adapters", "layers_to_transform"),
    ("dare_linear", ["a", "b"], [1.0, 1.0], {"density": 0.5}, spoil(0, init_lora_weights="pissa"), AdapterInvalid, "adapters", "'pissa'"),
    ("cat", ["a", "b"], [1.0, 1.0], {}, spoil(1, use_dora=True), AdapterInvalid, "adapters", "adapters[1]: DoRA"),
    ("svd", ["a", "b"], [1.0, 1.0], {}, spoil(1, r=4), AdapterInvalid, "adapters", "adapters[1]: module model.layers.0.mlp"),
]


@pytest.mark.parametrize("method, names, weights, options, edit, error, param, message", REFUSALS, ids=[row[-1][:30] for row in REFUSALS])
def test_refuses(setup, method, names, weights, options, edit, error, param, message):
    adapters = [read_adapter_dir(setup.adapter_dirs[name]) for name in names]
    if edit is not None:
        edit(adapters)
    with pytest.raises(error) as raised:
        merge_adapters(adapters, weights, method, setup.shapes, **options)
    assert message in str(raised.value)
    assert raised.value.param == param


@pytest.mark.parametrize("method, names, options", [("cat", ["a", "c"], {}), ("dare_ties", ["a", "b"], {"density": 0.5, "seed": 1})])
def test_merged_adapter_loads_in_peft_and_loraplex_and_generates_the_same(setup, tmp_path, method, names, options):
    config, tensors = merge(setup, names, [0.8, 0.6], method, **options)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "adapter_model.safetensors")

    base = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path).eval()
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert {k.replace(".default", "") for k in loaded} == set(tensors)
    assert all(torch.equal(v, tensors[k.replace(".default", "")]) for k, v in loaded.items())

    engine = Engine(EngineConfig(model=str(setup.model_dir), max_loras=2, max_lora_rank=16))
    engine.load_adapter("merged", tmp_path)
    prompt = torch.randint(3, VOCAB_SIZE, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    base_tokens, merged_tokens = (c.output_ids for c in engine.generate([prompt, prompt], [None, "merged"], params))
    inputs = torch.tensor([prompt])
    with torch.no_grad():
        out = peft.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2
        )
    assert merged_tokens == out[0, len(prompt) :].tolist()
    assert merged_tokens != base_tokens


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_model_order_is_the_order_peft_visits_modules_in(arch):
    fields = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[arch](**fields))
    visited = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in TARGET_NAMES]
    assert sorted(visited, key=model_order) == visited
    assert sorted(reversed(visited), key=model_order) == visited

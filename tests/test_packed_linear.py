"""Prepacked oneDNN linears (engine/packed_linear.py) compute what `nn.Linear` computes.

Table-driven over widths, row counts (a decode step of one row up to a prefill chunk), input
ranks, bias and dtypes; plus what `pack_linears` must leave alone and what it must free.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.fused_projections import GroupSlice
from loraplex.engine.packed_linear import PackedLinear, cpu_packs, pack_linears

# dtype -> largest |packed - reference| relative to the reference's largest magnitude
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("in_features", "out_features", "rows"),
    [(64, 96, 1), (64, 96, 7), (128, 344, 32), (344, 128, 100), (96, 4096, 3), (48, 40, 0)],
)
def test_packed_linear_equals_nn_linear(in_features, out_features, rows, bias, dtype):
    if not cpu_packs(dtype):
        pytest.skip(f"this CPU's oneDNN has no packed {dtype} GEMM (fp16 needs avx_ne_convert or avx512_fp16)")
    torch.manual_seed(in_features + out_features + rows)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    x = torch.randn(rows, in_features).to(dtype)
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    got = PackedLinear(linear)(x)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    if rows:
        error = (got.float() - expected).abs().max() / expected.abs().max()
        assert error <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_pack_linears_packs_only_what_this_cpu_multiplies_and_keeps_the_output(dtype):
    """On a CPU without fp16 GEMMs an fp16 model is left as it is, rather than failing at start-up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).to(dtype)
    x = torch.randn(3, 32).to(dtype)
    expected = model(x).float()
    packed = pack_linears(model)
    assert packed == (["0", "2"] if cpu_packs(dtype) else [])
    error = (model(x).float() - expected).abs().max() / expected.abs().max()
    assert error <= TOLERANCE[dtype]


def test_fp32_packs_wherever_onednn_runs_and_other_types_never_do():
    assert cpu_packs(torch.float32) == torch.backends.mkldnn.is_available()
    assert not cpu_packs(torch.int8)


def test_packed_linear_takes_batched_inputs():
    linear = nn.Linear(32, 48)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-6)


def test_pack_linears_replaces_plain_linears_only_and_keeps_tied_embeddings(llama):
    model = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    embedding = model.model.embed_tokens.weight
    x = torch.randint(3, 100, (1, 9))
    expected = model(x).logits
    packed = pack_linears(model)
    assert "lm_head" in packed and "model.layers.0.self_attn.q_proj" in packed
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert model.model.embed_tokens.weight is embedding  # the embedding a tied head shares stays
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_pack_linears_frees_an_untied_weight():
    model = nn.Sequential(nn.Linear(16, 32))
    weight = model[0].weight
    pack_linears(model)
    assert isinstance(model[0], PackedLinear)
    assert not any(p is weight for p in model.parameters())


def test_pack_linears_leaves_other_modules_alone():
    class QuantizedLike(nn.Linear):  # a subclass such as bitsandbytes' Linear4bit
        pass

    model = nn.Sequential(QuantizedLike(8, 8), nn.Embedding(10, 8), nn.LayerNorm(8))
    assert pack_linears(model) == []
    assert type(model[0]) is QuantizedLike


@pytest.mark.parametrize(("backend", "kind"), [("auto", PackedLinear), ("reference", nn.Linear)])
def test_linear_backend_setting_chooses_the_base_linears(llama, backend, kind):
    """auto: q/k/v and gate/up fused into one prepacked GEMM each; reference: the model's own linears."""
    engine = Engine(EngineConfig(model=str(llama.model_dir), max_loras=2, max_lora_rank=16, linear_backend=backend))
    try:
        attn = engine.base.model.model.layers[0].self_attn
        assert type(attn.o_proj.base_layer) is kind and type(engine.base.model.lm_head) is kind
        if backend == "auto":
            assert type(attn.fused_qkv.linear) is kind and type(attn.q_proj.base_layer) is GroupSlice
        else:
            assert not hasattr(attn, "fused_qkv") and type(attn.q_proj.base_layer) is kind
    finally:
        engine.stop()

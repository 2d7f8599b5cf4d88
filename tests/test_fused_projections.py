"""Fused q/k/v and gate/up projections (engine/fused_projections.py) compute what the separate ones do.

The groups must return each member's own output (base and LoRA delta), keep one copy of the
weights, leave alone what cannot fuse, and keep a member called on its own working.
"""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loraplex.engine.fused_projections import FusedProjections, GroupSlice, fuse_projections
from loraplex.engine.lora_layer import LoraContext, LoraLinear
from loraplex.engine.ops.lora import build_lora_batch
from loraplex.engine.packed_linear import PackedLinear, pack_linears


def weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's q/k/v carry biases
def test_fused_groups_return_each_projections_own_output(tiny_setups, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_setups[arch].model_dir, dtype=torch.float32)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    x = torch.randn(7, model.config.hidden_size)
    expected = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)]
    logits = model(torch.arange(3, 12)[None]).logits

    made = fuse_projections(model)

    layers = model.config.num_hidden_layers
    assert len(made) == 2 * layers and "model.layers.1.self_attn.fused_qkv" in made
    got = [*attn.fused_qkv(x), *mlp.fused_gate_up(x)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    alone = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)]
    for g, e in zip(alone, expected, strict=True):  # a member called on its own, through its slice
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(torch.arange(3, 12)[None]).logits, logits, rtol=1e-5, atol=1e-5)


def test_fused_groups_add_each_members_lora_delta_to_its_own_columns():
    torch.manual_seed(0)
    context = LoraContext()
    bases = [nn.Linear(32, out, bias=False) for out in (32, 16, 16)]
    members = [LoraLinear(base, num_slots=4, max_rank=8, dtype=torch.float32, context=context) for base in bases]
    for index, member in enumerate(members):
        if index != 1:  # the middle projection is not targeted: a zero slot
            member.write_slot(2, torch.randn(8, 32), torch.randn(member.out_features, 8), scaling=0.5)
    x = torch.randn(5, 32)
    for strategy in ("dense", "gather", "segment"):
        context.batch = build_lora_batch([4, 2, 2, 4, 2], {2: 8}, 8, x.device, strategy)
        expected = [member(x) for member in members]
        group = FusedProjections([member.base_layer for member in members], members)
        for got, want in zip(group(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    context.batch = None


def test_fusion_then_packing_keeps_one_copy_of_the_weights(llama):
    model = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=torch.float32)
    before = weight_bytes(model)
    fuse_projections(model)
    pack_linears(model)
    attn = model.model.layers[0].self_attn
    assert type(attn.fused_qkv.linear) is PackedLinear and type(attn.q_proj) is GroupSlice
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert weight_bytes(model) <= before * 1.01  # packing pads a little; nothing is held twice


def test_layers_that_cannot_fuse_are_left_alone(llama):
    class QuantizedLike(nn.Linear):  # a subclass such as bitsandbytes' Linear4bit
        pass

    model = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=torch.float32)
    layer = model.model.layers[0]
    q = layer.self_attn.q_proj
    layer.self_attn.q_proj = QuantizedLike(q.in_features, q.out_features, bias=False)
    model.model.layers[1].mlp.up_proj.to(torch.float64)  # a dtype its group partner does not have
    made = fuse_projections(model)
    assert "model.layers.0.self_attn.fused_qkv" not in made and "model.layers.1.mlp.fused_gate_up" not in made
    assert "model.layers.0.mlp.fused_gate_up" in made and "model.layers.1.self_attn.fused_qkv" in made
    assert not hasattr(layer.self_attn, "fused_qkv") and type(layer.self_attn.k_proj) is nn.Linear

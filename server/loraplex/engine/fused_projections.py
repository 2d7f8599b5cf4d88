"""Projections that read one input, computed as one GEMM: q/k/v, and gate/up.

Owns: `FusedProjections`, which concatenates its members' base weights once at start-up into one
`nn.Linear` (prepacked afterwards like every other plain linear) and returns each member's output
as a column slice of one product, each with its member's LoRA delta added; `fuse_projections`,
which builds the groups of every decoder layer. A member stays where it was (its slot stacks are
written and validated by name as before); only its base layer becomes a `GroupSlice`, a view of the
group, so a member called alone still returns its own output. The weights are the same values
(one copy: the members' own are dropped). It must not fuse quantized layers, layers with
different inputs, dtypes or devices, nor change what the decoder layers compute.
"""

import torch
from torch import nn

from loraplex.engine.lora_layer import LoraLinear

# Each group: the module holding the projections, the projections, the group's attribute name, and
# what else the runner reads from the holder to compute the rest of it (the Llama-family MLP:
# down_proj(act_fn(gate) * up)).
GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "fused_qkv", ()),
    ("mlp", ("gate_proj", "up_proj"), "fused_gate_up", ("act_fn", "down_proj")),
)


class FusedProjections(nn.Module):
    """`[member(x) for member in members]` as one GEMM over the concatenated weights."""

    def __init__(self, linears: list[nn.Linear], members: list[nn.Module]):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])  # [sum(out), in]
        has_bias = linears[0].bias is not None
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if has_bias:
                self.linear.bias.copy_(torch.cat([linear.bias.detach() for linear in linears]))
        self.linear.requires_grad_(False)
        ends = torch.tensor([linear.out_features for linear in linears]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))
        self.members = list(members)  # a plain list: the members stay registered where they were

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [T, in] -> one [T, out_i] view per member
        y = self.linear(x)  # [T, sum(out)]
        outputs = [y[:, start:end] for start, end in self.bounds]
        if all(isinstance(member, LoraLinear) for member in self.members):
            context = self.members[0].context
            if context.batch is not None:  # every member's delta in one call: one shrink reading x for all
                context.op.add_delta(y, x, [m.lora_a for m in self.members], [m.lora_b for m in self.members], context.batch)
            return outputs
        for member, part in zip(self.members, outputs):
            if isinstance(member, LoraLinear):
                member.add_delta(part, x)
        return outputs


class GroupSlice(nn.Module):
    """One member's base output, taken from its group (for a member called on its own)."""

    def __init__(self, group: FusedProjections, index: int):
        super().__init__()
        self.in_features = group.linear.in_features
        start, end = group.bounds[index]
        self.out_features = end - start
        self.bounds = (start, end)
        self._group = [group]  # a list, so the group is not registered twice in the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, end = self.bounds
        return self._group[0].linear(x)[..., start:end]


def _base_linear(member: nn.Module) -> nn.Module:
    return member.base_layer if isinstance(member, LoraLinear) else member


def _fusable(linears: list[nn.Module]) -> bool:
    first = linears[0]
    return all(
        type(linear) is nn.Linear
        and linear.in_features == first.in_features
        and linear.weight.dtype == first.weight.dtype
        and linear.weight.device == first.weight.device
        and (linear.bias is None) == (first.bias is None)
        for linear in linears
    )


def fuse_projections(model: nn.Module) -> list[str]:
    """Give every decoder layer of `model` its fused q/k/v and gate/up groups, where they can fuse.

    Returns:
        The qualified names of the groups made (e.g. `model.layers.0.self_attn.fused_qkv`).
    """
    made = []
    for index, layer in enumerate(model.model.layers):
        for holder_name, names, group_name, needs in GROUPS:
            holder = getattr(layer, holder_name, None)
            members = [getattr(holder, name, None) for name in names]
            if any(member is None for member in members) or not all(hasattr(holder, need) for need in needs):
                continue
            linears = [_base_linear(member) for member in members]
            if not _fusable(linears):
                continue
            group = FusedProjections(linears, members)
            setattr(holder, group_name, group)
            for position, (name, member) in enumerate(zip(names, members)):
                view = GroupSlice(group, position)
                if isinstance(member, LoraLinear):
                    member.base_layer = view
                else:
                    setattr(holder, name, view)
            made.append(f"model.layers.{index}.{holder_name}.{group_name}")
    return made

"""The base's dense linears with their weights prepacked once for oneDNN, on CPU.

Owns: `PackedLinear`, a drop-in for `nn.Linear` whose weight is reordered at start-up into the
layout oneDNN's GEMM reads fastest (the prepacking vLLM's CPU build and inductor's weight freezing
do), and `pack_linears`, which swaps every plain `nn.Linear` of a model for one. Values are never
changed: only their layout. The packed op takes any number of rows, so decode and prefill steps of
any size share it. It must not touch quantized (bitsandbytes) layers, CUDA tensors or the LoRA
slot stacks, and it keeps nothing of the original weight except where another module shares it
(a tied lm_head keeps the embedding's).
"""

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PackedLinear(nn.Module):
    """`x @ W.T + b` through oneDNN on a weight reordered once at construction."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()  # [out, in]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(module: nn.Module) -> bool:
    """A plain dense `nn.Linear` on CPU in a dtype oneDNN multiplies (not a quantized subclass)."""
    return (
        type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
    )


def pack_linears(model: nn.Module) -> list[str]:
    """Replace every packable `nn.Linear` of `model` (LoRA wrappers' base layers included) in place.

    Returns:
        The qualified names of the modules replaced.
    """
    packed = [(name, module) for name, module in model.named_modules() if can_pack(module)]
    for name, module in packed:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(module))
    return [name for name, _ in packed]

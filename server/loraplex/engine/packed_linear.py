"""The base's dense linears with their weights prepacked once for oneDNN, on CPU.

Owns: `PackedLinear`, a drop-in for `nn.Linear` whose weight is reordered at start-up into the
layout oneDNN's GEMM reads fastest (the prepacking vLLM's CPU build and inductor's weight freezing
do), and `pack_linears`, which swaps every plain `nn.Linear` of a model for one. Values are never
changed: only their layout. The packed op takes any number of rows, so decode and prefill steps of
any size share it. A dtype this CPU's oneDNN cannot multiply packed (fp16 without avx_ne_convert
or avx512_fp16) stays a plain `nn.Linear`. It must not touch quantized (bitsandbytes) layers, CUDA tensors or the LoRA
slot stacks, and it keeps nothing of the original weight except where another module shares it
(a tied lm_head keeps the embedding's).
"""

import functools

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN multiplies `dtype` weights prepacked (fp16 needs avx_ne_convert or avx512_fp16).

    Asked of oneDNN itself, once per dtype, by reordering a one-element weight: no CPU flag list to keep.
    """
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(1, 1, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


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
    """A plain dense `nn.Linear` on CPU in a dtype this CPU's oneDNN multiplies (not a quantized subclass)."""
    return type(module) is nn.Linear and module.weight.device.type == "cpu" and cpu_packs(module.weight.dtype)


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

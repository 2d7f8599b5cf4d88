"""A step's host-built integer inputs, sent to the device in one copy that the host does not wait for.

Owns: `to_device`, which packs several Python lists of ints (token ids, positions, block tables,
LoRA routing) into one host tensor, pinned on CUDA (torch's caching host allocator keeps each
pinned block until its copy has finished, so reuse is safe), copies it with `non_blocking=True`,
and hands back device views, one per list. On CPU it is one `torch.tensor` and views of it. The
device runs the copy in stream order before the kernels that read it, so the step never stalls
on its inputs. It must not read anything back from the device.
"""

import itertools
from collections.abc import Sequence

import torch


def to_device(lists: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One 1-D tensor of `dtype` on `device` per list, all from one host buffer and one copy.

    >>> [t.tolist() for t in to_device([[1, 2], [], [3]], torch.int32, torch.device("cpu"))]
    [[1, 2], [], [3]]
    """
    host = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        host = host.to(device)
    return list(host.split([len(values) for values in lists]))

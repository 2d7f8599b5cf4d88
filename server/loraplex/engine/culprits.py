"""Which sequences of a broken step broke it: each is run alone, and the ones that break alone are it.

Owns: `find_culprits`, the diagnosis the engine runs when a forward pass raises or gives some
sequences non-finite logits. Running a sequence alone rewrites exactly the KV-cache positions its
chunk wrote in the batch, so the diagnosis leaves the innocent ones as they would have been; the
engine then recomputes their chunk in the next step. It decides nothing about requests itself.
"""

import torch

from loraplex.engine.request import Request
from loraplex.engine.runner import ModelRunner
from loraplex.engine.scheduler import ScheduledSeq


def find_culprits(runner: ModelRunner, seqs: list[ScheduledSeq], null_slot: int) -> list[tuple[Request, str]]:
    """The sequences that raise, or give non-finite logits, when run alone, with what went wrong."""
    found = []
    for seq in seqs:
        try:
            logits, _ = runner.run([seq], null_slot)
        except Exception as exc:
            found.append((seq.request, f"{type(exc).__name__}: {exc}"))
            continue
        if not bool(torch.isfinite(logits).all()):
            found.append((seq.request, "its logits are not finite (NaN or Inf)"))
    return found

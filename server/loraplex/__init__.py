"""loraplex: serve many LoRA adapters on one resident base model, with unmerged deltas in every step."""

__version__ = "0.1.0"

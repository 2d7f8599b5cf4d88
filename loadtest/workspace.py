"""The files one suite run serves: a random base checkpoint and the adapter directories over it.

Owns: `Workspace` (where the base, the adapter store, the compare phase's adapters and the
cold-start adapters lie), `build_workspace`, which writes them from a `SuiteConfig`, and
`save_base`, its base checkpoint alone (the fleet benchmark's too). The compare directory holds
the store's first `max(COMPARE_COUNTS)` adapters as hard links, real directories that every
server loads alike (loraplex's store reads refuse symlinks). It must not start servers or
measure anything.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from loadtest.checkpoints import make_random_adapters, model_config, save_random_model
from loadtest.suite_config import COMPARE_COUNTS, SuiteConfig


@dataclass
class Workspace:
    """The checkpoint and adapter directories of one suite run."""

    root: Path
    model: Path = field(init=False)
    store: Path = field(init=False)  # every sweep adapter: what loraplex serves in the sweep
    compare: Path = field(init=False)  # the first max(COMPARE_COUNTS): what every server of the compare phase serves
    cold: Path = field(init=False)  # adapters loraplex has never seen, for cold starts

    def __post_init__(self):
        self.model, self.store = self.root / "base", self.root / "store"
        self.compare, self.cold = self.root / "compare", self.root / "cold"

    def compare_adapters(self) -> dict[str, Path]:
        """The compare phase's adapters by name, `lora-0` first."""
        return {f"lora-{index}": self.compare / f"lora-{index}" for index in range(max(COMPARE_COUNTS))}


def save_base(config: SuiteConfig, path: Path) -> PretrainedConfig:
    """Save the random base checkpoint of `config` (its model, dtype and seed) to `path`; returns its config."""
    base = model_config(config.model_config, config.max_positions)
    save_random_model(path, base, getattr(torch, config.dtype), config.seed)
    return base


def build_workspace(config: SuiteConfig, root: Path) -> Workspace:
    """Write the base checkpoint and every adapter directory of `config` under `root`."""
    space = Workspace(root)
    base = save_base(config, space.model)
    dtype = getattr(torch, config.dtype)
    print(f"building {config.store_adapters} rank-{config.rank} adapters ...", flush=True)
    names = make_random_adapters(base, space.store, config.store_adapters, config.rank, seed=config.seed, dtype=dtype)
    for name in space.compare_adapters():
        shutil.copytree(names[name], space.compare / name, copy_function=os.link)
    make_random_adapters(base, space.cold, config.cold_adapters, config.rank, prefix="cold-", seed=config.seed + 1, dtype=dtype)
    return space

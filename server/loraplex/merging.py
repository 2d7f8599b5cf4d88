"""Merging several LoRA adapters into one new PEFT adapter, with peft's `add_weighted_adapter` semantics.

Owns: the merge methods as small pure functions over one module's tensors, the checks that refuse a
combination peft could not merge (typed errors naming the problem), the new adapter's config and
tensors, and the replay of peft's random stream that makes DARE reproducible. It reads and writes no
files and knows no engine or slot: callers pass adapters as `read_adapter_dir` returns them plus the
base's module shapes, then save or register the result themselves.

For a module m, with adapter i's weight w_i, scaling s_i (alpha / r, or alpha / sqrt(r) with rsLoRA)
and delta D_i = s_i * B_i @ A_i, the merged adapter (scaling 1: lora_alpha = r) holds:

    cat      A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], zero-padded to r = sum of the ranks,
             so B @ A = sum_i w_i D_i (up to float rounding).
    svd      B, A = the top-`rank` singular triplets of sum_i w_i D_i (rank defaults to the largest input rank).
    linear   A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i and B = sum_i sqrt|w_i s_i| B_i, so B @ A = sum_i w_i D_i
             plus, for every pair i != j of adapters sharing m, the cross term sign(w_j s_j) sqrt|w_i s_i w_j s_j| B_i @ A_j.
    ties     A and B each merged by TIES: keep each tensor's top `density` fraction by magnitude, elect each
             entry's sign by the sum over adapters, average the weighted entries that agree with it.
    dare_*   as linear / ties, but each tensor is pruned at random (kept with probability `density`, then
             divided by it) instead of by magnitude.

Only the adapters that target m take part in m; the merged targets are the union. DARE's masks are those
peft draws after `torch.manual_seed(seed)`: a private generator replays, in the model's module order,
the draws peft's `inject_adapter` makes when it creates the merged layers, then draws the masks in
peft's order, so callers' global RNG is left alone. One deliberate difference from peft 0.21: the
merged config says `use_rslora: false`, where peft copies the first adapter's flag and so scales the
merge of an rsLoRA adapter by sqrt(r) (huggingface/peft#3449).
"""

import copy
import math
from collections.abc import Mapping, Sequence
from functools import reduce

import torch
import torch.nn.functional as F

from loraplex.engine.lora_layer import TARGET_NAMES
from loraplex.errors import AdapterInvalid, RequestInvalid
from loraplex.lora.adapter import _PEFT_PREFIX, LoraAdapter, LoraWeights, ModuleShape, build_adapter

MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
# peft's `init_lora_weights` values whose draws from the RNG `_replay_injection` reproduces.
_REPLAYED_INITS = (True, False, "gaussian", "eva")
_SAME_LAYERS_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")
MAX_SEED = (1 << 63) - 1  # torch.Generator seeds are 64-bit

Part = tuple[LoraWeights, float]  # one adapter's pair at a module, and its merge weight


def merge_adapters(
    adapters: Sequence[tuple[Mapping, Mapping[str, torch.Tensor]]],
    weights: Sequence[float],
    method: str,
    base_modules: Mapping[str, ModuleShape],
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Combine PEFT LoRA adapters into one new adapter, as peft's `add_weighted_adapter` does.

    Args:
        adapters: two or more `(config, tensors)` as read from PEFT directories (`read_adapter_dir`).
        weights: one weight per adapter; negative weights subtract.
        method: one of MERGE_METHODS.
        base_modules: the base's LoRA-targetable modules and their shapes; every adapter is validated
            against them, as `build_adapter` does for serving.
        density: the fraction of entries kept, in (0, 1]; required by ties, dare_linear and dare_ties only.
        rank: the merged rank for svd (default: the largest input rank); not accepted by other methods.
        seed: DARE's seed: the masks equal peft's after `torch.manual_seed(seed)`.

    Returns:
        The new adapter's `adapter_config.json` contents (the first adapter's, with the merged `r`,
        `lora_alpha = r`, the union of `target_modules`) and its tensors, keyed as PEFT saves them.

    Raises:
        RequestInvalid: the combination cannot be merged (`param` names the argument at fault).
        AdapterInvalid: an adapter is invalid on this base (the message names which one).
    """
    _check_arguments(len(adapters), weights, method, density, rank, seed)
    configs = [config for config, _ in adapters]
    sources = [_validated(index, config, tensors, base_modules) for index, (config, tensors) in enumerate(adapters)]
    _check_compatible(configs, method)
    ranks = [_peft_rank(config) for config in configs]
    modules = sorted({module for source in sources for module in source.modules}, key=model_order)
    new_rank = _merged_rank(method, ranks, rank, sources, [base_modules[module] for module in modules])
    generator = None
    if method.startswith("dare_"):
        generator = torch.Generator().manual_seed(seed)
        _replay_injection(generator, [base_modules[module] for module in modules], new_rank, configs[0].get("init_lora_weights", True))
    dtype = reduce(torch.promote_types, (tensor.dtype for _, tensors in adapters for tensor in tensors.values()))
    tensors = {}
    for module in modules:
        parts = [(source.modules[module], float(weight)) for source, weight in zip(sources, weights) if module in source.modules]
        if method == "cat":
            lora_a, lora_b = cat_module(parts, new_rank)
        elif method == "svd":
            lora_a, lora_b = svd_module(parts, new_rank)
        else:
            lora_a, lora_b = combine_module(method, parts, density, generator)
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    return _merged_config(configs, new_rank), tensors


# ----- one module's tensors ----------------------------------------------------------------------


def cat_module(parts: list[Part], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cat`: the weighted, scaled A's stacked along the rank, the B's beside each other, zero-padded to `rank`.

    Args:
        parts: the adapters that target the module, in order, with their weights.
        rank: the merged rank (the sum of the adapters' ranks).

    Returns:
        A [rank, in] and B [out, rank].
    """
    lora_a = torch.cat([lora.lora_a * weight * lora.scaling for lora, weight in parts], dim=0)  # [sum r_i, in]
    lora_b = torch.cat([lora.lora_b for lora, _ in parts], dim=1)  # [out, sum r_i]
    return F.pad(lora_a, (0, 0, 0, rank - lora_a.shape[0])), F.pad(lora_b, (0, rank - lora_b.shape[1]))


def svd_module(parts: list[Part], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`svd`: the best rank-`rank` factorisation of the weighted sum of the adapters' deltas.

    peft takes the SVD of the dense [out, in] sum; here the sum stays factored as B @ A (the `cat`
    factors, R = sum of ranks) and only an [R, R] core is decomposed, in float64: the same result to
    float32 rounding, in milliseconds where a dense SVD of one [4096, 11008] delta takes a minute.

    Args:
        parts: the adapters that target the module, in order, with their weights.
        rank: the merged rank, at most min(in, out); missing singular directions are zero-padded.

    Returns:
        A [rank, in] (the top right singular vectors) and B [out, rank] (left ones times singular values).
    """
    lora_a = torch.cat([lora.lora_a.double() * (weight * lora.scaling) for lora, weight in parts], dim=0)  # [R, in]
    lora_b = torch.cat([lora.lora_b.double() for lora, _ in parts], dim=1)  # [out, R]
    q_b, r_b = torch.linalg.qr(lora_b)  # [out, m], [m, R]
    q_a, r_a = torch.linalg.qr(lora_a.T)  # [in, n], [n, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [m, k], [k], [k, n]
    merged_b = (q_b @ u[:, :rank]) * s[:rank]  # [out, min(rank, k)]
    merged_a = vh[:rank] @ q_a.T  # [min(rank, k), in]
    missing = rank - merged_a.shape[0]
    return F.pad(merged_a, (0, 0, 0, missing)).float(), F.pad(merged_b, (0, missing)).float()


def split_weights(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's split of each w_i * s_i between A and B: sqrt|w_i s_i| on each, the sign on A's side. [n], [n]."""
    scaled = [weight * lora.scaling for lora, weight in parts]
    weights_a = [math.sqrt(abs(value)) * (1 if value >= 0 else -1) for value in scaled]
    weights_b = [math.sqrt(abs(value)) for value in scaled]
    return torch.tensor(weights_a, dtype=torch.float32), torch.tensor(weights_b, dtype=torch.float32)


def combine_module(
    method: str, parts: list[Part], density: float | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear`, `ties`, `dare_linear`, `dare_ties`: the A's and the B's each combined on their own.

    Args:
        method: linear, ties, dare_linear or dare_ties.
        parts: the adapters that target the module, in order, with their weights; all of one rank r.
        density: the fraction kept by ties / DARE pruning.
        generator: DARE's random stream, drawn A's first, then B's, adapter by adapter.

    Returns:
        A [r, in] and B [out, r].
    """
    weights_a, weights_b = split_weights(parts)
    lora_a = _combine(method, [lora.lora_a for lora, _ in parts], weights_a, density, generator)
    lora_b = _combine(method, [lora.lora_b for lora, _ in parts], weights_b, density, generator)
    return lora_a, lora_b


def _combine(
    method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    if method == "linear":
        return task_arithmetic(tensors, weights)
    if method == "ties":
        return disjoint_merge(torch.stack([prune_by_magnitude(tensor, density) for tensor in tensors]), weights)
    pruned = torch.stack([prune_at_random(tensor, density, generator) for tensor in tensors])
    return disjoint_merge(pruned, weights) if method == "dare_ties" else _weighted(pruned, weights).sum(dim=0)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stacked: [n, ...] times weights: [n], broadcast over the rest."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * tensors[i]: n tensors of one shape, weights [n]."""
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude (ties broken as `torch.topk` does)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    kept = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices
    mask[kept] = 1
    return tensor * mask.reshape(tensor.shape)


def prune_at_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by it (draws nothing at 1)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean: stacked [n, ...] (pruned, unweighted), weights [n] -> [...]."""
    agrees = stacked.sign() == torch.where(stacked.sum(dim=0) >= 0, 1, -1)  # [n, ...]
    merged = (_weighted(stacked, weights) * agrees).sum(dim=0)
    return merged / torch.clamp(agrees.sum(dim=0), min=1.0)


# ----- checks, ranks, config ---------------------------------------------------------------------


def _check_arguments(count: int, weights, method: str, density, rank, seed) -> None:
    if method not in MERGE_METHODS:
        raise RequestInvalid(f"unknown merge method {method!r}; supported: {', '.join(MERGE_METHODS)}", param="method")
    if count < 2:
        raise RequestInvalid(f"merging needs at least 2 adapters, got {count}", param="adapters")
    if len(weights) != count:
        raise RequestInvalid(f"got {len(weights)} weights for {count} adapters; give one weight per adapter", param="weights")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise RequestInvalid(f"weights must be finite numbers, got {list(weights)}", param="weights")
    if method in DENSITY_METHODS:
        if density is None:
            raise RequestInvalid(f"method {method!r} needs a density in (0, 1]", param="density")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise RequestInvalid(f"density must be in (0, 1], got {density!r}", param="density")
    elif density is not None:
        raise RequestInvalid(f"density applies to {', '.join(DENSITY_METHODS)} only, not to {method!r}", param="density")
    if method != "svd" and rank is not None:
        raise RequestInvalid(f"rank applies to svd only, not to {method!r}", param="rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RequestInvalid(f"rank must be a positive integer, got {rank!r}", param="rank")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RequestInvalid(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}", param="seed")


def _validated(index: int, config: Mapping, tensors: Mapping[str, torch.Tensor], base_modules) -> LoraAdapter:
    """The adapter as serving would accept it (in float32 for the merge math); errors name which one."""
    try:
        return build_adapter(f"adapters[{index}]", config, tensors, base_modules, max_rank=1 << 16, dtype=torch.float32)
    except AdapterInvalid as exc:
        raise type(exc)(f"adapters[{index}]: {exc}", param="adapters") from None


def _check_compatible(configs: list[Mapping], method: str) -> None:
    """What peft needs of the adapters together: one form of target_modules, the same layers, a replayable init."""
    forms = {type(config.get("target_modules")) for config in configs}
    if not forms <= {str, list}:
        raise RequestInvalid("every adapter must list target_modules (as names or a regex)", param="adapters")
    if len(forms) > 1:
        raise RequestInvalid(
            "adapters mix target_modules given as a regex string and as a list of names; peft cannot merge them",
            param="adapters",
        )
    for field in _SAME_LAYERS_FIELDS:
        values = [config.get(field) or None for config in configs]
        if any(value != values[0] for value in values):
            raise RequestInvalid(
                f"adapters differ in {field} ({', '.join(map(repr, values))}); the merged adapter can only keep one",
                param="adapters",
            )
    init = configs[0].get("init_lora_weights", True)
    if method.startswith("dare_") and (init.lower() if isinstance(init, str) else init) not in _REPLAYED_INITS:
        raise RequestInvalid(
            f"the first adapter has init_lora_weights={init!r}: its random draws in peft cannot be replayed, "
            "so DARE could not match peft's masks; put another adapter first",
            param="adapters",
        )


def _peft_rank(config: Mapping) -> int:
    """An adapter's rank as peft's merge counts it: r, or the largest rank_pattern value if bigger."""
    return int(max([config["r"], *(config.get("rank_pattern") or {}).values()]))


def _merged_rank(method: str, ranks: list[int], rank: int | None, sources: list[LoraAdapter], shapes: list[ModuleShape]) -> int:
    if method == "cat":
        return sum(ranks)
    if method == "svd":
        new_rank = rank or max(ranks)
        smallest = min(min(shape.in_features, shape.out_features) for shape in shapes)
        if new_rank > smallest:
            raise RequestInvalid(f"svd rank {new_rank} exceeds {smallest}, the smallest side of a merged module", param="rank")
        return new_rank
    if len(set(ranks)) > 1:
        raise RequestInvalid(
            f"method {method!r} needs adapters of equal rank, got ranks {ranks}; merge adapters of different "
            f"ranks with 'cat' (exact, rank {sum(ranks)}) or 'svd' (rank {max(ranks)} or as given)",
            param="adapters",
        )
    for index, source in enumerate(sources):
        for module, lora in source.modules.items():
            if lora.rank != ranks[0]:
                raise RequestInvalid(
                    f"method {method!r} needs every module at one rank ({ranks[0]}), but adapters[{index}] has {module} "
                    f"at rank {lora.rank} (its rank_pattern gives modules different ranks); merge it with 'cat' or 'svd'",
                    param="adapters",
                )
    return ranks[0]


def _merged_config(configs: list[Mapping], rank: int) -> dict:
    """The first adapter's config, as peft's merge rewrites it (plus use_rslora=false: the merge's scaling is 1)."""
    targets = [config["target_modules"] for config in configs]
    config = copy.deepcopy(dict(configs[0]))
    config.update(
        r=rank,
        lora_alpha=rank,
        target_modules="|".join(f"({target})" for target in targets) if isinstance(targets[0], str) else sorted(set().union(*targets)),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
    )
    return config


def model_order(module: str) -> tuple:
    """Sort key giving the base model's module order, as peft visits it: by layer, then q, k, v, o, gate, up, down."""
    leaf = module.rsplit(".", 1)[-1]
    layers = tuple(int(part) for part in module.split(".") if part.isdigit())
    return layers, TARGET_NAMES.index(leaf) if leaf in TARGET_NAMES else len(TARGET_NAMES), module


def _replay_injection(generator: torch.Generator, shapes: list[ModuleShape], rank: int, init) -> None:
    """Draw what peft draws from torch's RNG while creating the merged adapter's layers, before any DARE mask.

    Per merged module, in model order: nn.Linear's own init of A [rank, in] and of B [out, rank], then
    `init_lora_weights`' init of A (kaiming uniform for true, normal for "gaussian", none for false or "eva").
    Only the number and kind of draws matter, not their bounds.
    """
    for shape in shapes:
        torch.empty(rank, shape.in_features).uniform_(generator=generator)
        torch.empty(shape.out_features, rank).uniform_(generator=generator)
        if init is True:
            torch.empty(rank, shape.in_features).uniform_(generator=generator)
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.empty(rank, shape.in_features).normal_(generator=generator)

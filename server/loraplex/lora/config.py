"""What an `adapter_config.json` may say, and which modules it selects, with bounded work.

Owns: `LoraSettings`, the fields of PEFT's `LoraConfig` that change what a LoRA adapter computes
at inference, each checked for type and range (every number finite and bounded, every string
and list bounded in length, the JSON bounded in depth), and every other field classified: ignored
because it only matters in training or initialisation, or refused with a message naming it
because it changes the forward pass in a way loraplex does not implement (DoRA, aLoRA, QALoRA,
layer replication, ...) or because PEFT's loading rewrites the base weights (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA, MiCA initialisations). `ModuleMatcher` answers, exactly as PEFT 0.21's
`check_target_module_exists` and `get_pattern_key` do, whether the config selects a module and
with which rank and alpha; its regexes (tenants' input) run on the `regex` engine with a time
budget, so a catastrophic pattern is refused in bounded time. It reads no tensors.
"""

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import regex

from loraplex.errors import AdapterInvalid, AdapterMalformed

TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output embedding
MAX_JSON_DEPTH = 16
MAX_RANK = 1 << 16
MAX_ALPHA = 1e6
MAX_PATTERN_CHARS = 256  # one regex or module name in target_modules, exclude_modules, patterns
MAX_PATTERNS = 1024  # entries of one list or pattern dict
MAX_LAYERS = 1 << 16  # entries of layers_to_transform, and the largest layer index
MATCH_BUDGET_SECONDS = 1.0  # regex matching for one adapter, in all

# Fields that change the forward pass; refused unless absent, false, empty or null.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adapters (use_dora=true) are not supported yet",
    "modules_to_save": "modules_to_save is not supported: an adapter may only carry LoRA A/B pairs",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D layers) is not supported",
    "lora_bias": "lora_bias=true is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "megatron_config": "megatron_config (Megatron parallel layers) is not supported",
    "velora_config": "velora_config is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QALoRA (use_qalora=true) is not supported",
    "monteclora_config": "monteclora_config is not supported",
    "layer_replication": "layer_replication changes the base model's layers and is not supported",
    "target_parameters": "target_parameters (LoRA on parameters, not modules) is not supported",
    "use_bdlora": "use_bdlora (block-diagonal LoRA) is not supported",
    "arrow_config": "arrow_config (Arrow routing) is not supported",
    "kasa_config": "kasa_config is not supported",
}
# Initialisations after which the A/B pair alone is the whole adapter.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _where(field: str) -> str:
    return f"adapter_config.json: {field}"


def check_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise AdapterMalformed(f"adapter_config.json is nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _number(config: Mapping, field: str, integer: bool, upper: float, label: str | None = None) -> float:
    value = config.get(field)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not 0 < value <= upper:
        what = "a positive integer" if integer else "a finite positive number"
        raise AdapterInvalid(f"{_where(label or field)} must be {what} of at most {upper:g}, got {value!r}")
    return value


def _strings(config: Mapping, field: str, allow_single: bool) -> str | tuple[str, ...] | None:
    value = config.get(field)
    if value is None:
        return None
    if isinstance(value, str) and allow_single:
        if len(value) > MAX_PATTERN_CHARS:
            raise AdapterInvalid(f"{_where(field)} is longer than {MAX_PATTERN_CHARS} characters")
        return value
    if not isinstance(value, list) or len(value) > MAX_PATTERNS or not all(isinstance(v, str) for v in value):
        raise AdapterInvalid(f"{_where(field)} must be a string or a list of at most {MAX_PATTERNS} strings")
    if any(len(v) > MAX_PATTERN_CHARS for v in value):
        raise AdapterInvalid(f"{_where(field)} has an entry longer than {MAX_PATTERN_CHARS} characters")
    return tuple(value)


def _patterns(config: Mapping, field: str, integer: bool, upper: float) -> dict[str, float]:
    value = config.get(field) or {}
    if not isinstance(value, dict) or len(value) > MAX_PATTERNS:
        raise AdapterInvalid(f"{_where(field)} must be an object of at most {MAX_PATTERNS} entries")
    for key in value:
        if len(key) > MAX_PATTERN_CHARS:
            raise AdapterInvalid(f"{_where(field)} has a key longer than {MAX_PATTERN_CHARS} characters")
        _number(value, key, integer, upper, label=f"{field}[{key!r}]")
    return dict(value)


def _layers(config: Mapping) -> int | tuple[int, ...] | None:
    value = config.get("layers_to_transform")
    if value is None or value == []:
        return None
    values = [value] if not isinstance(value, list) else value
    valid = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_LAYERS for v in values)
    if not valid or len(values) > MAX_LAYERS:
        raise AdapterInvalid(f"{_where('layers_to_transform')} must be a layer index or a list of them, got {value!r}")
    return value if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class LoraSettings:
    """The validated fields of an adapter config that decide what it computes."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]  # a regex (fullmatch on the module name) or name suffixes
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...]
    rank_pattern: dict[str, float]
    alpha_pattern: dict[str, float]

    def scaling(self, rank: int, alpha: float) -> float:
        """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def parse_settings(config: Mapping) -> LoraSettings:
    """Validate an adapter config; raises AdapterInvalid naming the first field at fault."""
    check_depth(config)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterInvalid(f"only LoRA adapters are supported; this adapter has peft_type={peft_type or 'missing'}")
    for field, problem in UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise AdapterInvalid(problem)
    if config.get("bias", "none") != "none":
        raise AdapterInvalid(f"bias={config['bias']!r} is not supported; only bias='none' adapters are accepted")
    init = config.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(plain, str) and init == plain) for plain in PLAIN_INITS):
        raise AdapterInvalid(
            f"init_lora_weights={init!r}: PEFT rewrites the base weights when it loads such an adapter; convert it "
            "to a plain LoRA first (peft's save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterInvalid(f"{_where('use_rslora')} must be true or false, got {use_rslora!r}")
    targets = _strings(config, "target_modules", allow_single=True)
    if targets is None:
        raise AdapterInvalid(f"{_where('target_modules')} is missing")
    layers_pattern = _strings(config, "layers_pattern", allow_single=True)
    return LoraSettings(
        rank=int(_number(config, "r", integer=True, upper=MAX_RANK)),
        alpha=float(_number(config, "lora_alpha", integer=False, upper=MAX_ALPHA)),
        use_rslora=use_rslora,
        target_modules=TARGET_NAMES if targets == ALL_LINEAR else targets,
        exclude_modules=_strings(config, "exclude_modules", allow_single=True),
        layers_to_transform=_layers(config),
        layers_pattern=(layers_pattern,) if isinstance(layers_pattern, str) and layers_pattern else tuple(layers_pattern or ()),
        rank_pattern=_patterns(config, "rank_pattern", integer=True, upper=MAX_RANK),
        alpha_pattern=_patterns(config, "alpha_pattern", integer=False, upper=MAX_ALPHA),
    )


class ModuleMatcher:
    """PEFT's module selection and pattern lookup for one adapter, within one time budget.

    Args:
        settings: the adapter's validated settings.
        budget: seconds all the matching may take together; past it, AdapterInvalid.
    """

    def __init__(self, settings: LoraSettings, budget: float = MATCH_BUDGET_SECONDS):
        self.settings = settings
        self._deadline = time.monotonic() + budget
        self._budget = budget

    def _search(self, pattern: str, text: str, field: str, full: bool = False) -> regex.Match | None:
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            find = regex.fullmatch if full else regex.match
            return find(pattern, text, timeout=remaining, concurrent=True)
        except TimeoutError:
            raise AdapterInvalid(
                f"{_where(field)}: its patterns take more than {self._budget:g} s to match this model's module names"
            ) from None
        except regex.error as exc:
            raise AdapterInvalid(f"{_where(field)}: {pattern!r} is not a valid regular expression: {exc}") from None

    def _match(self, pattern: str, text: str, field: str, full: bool = False) -> bool:
        return self._search(pattern, text, field, full) is not None

    def _names(self, names: str | tuple[str, ...], module: str, field: str) -> bool:
        if isinstance(names, str):
            return self._match(names, module, field, full=True)
        return module in names or any(module.endswith(f".{name}") for name in names)

    def selects(self, module: str) -> bool:
        """Whether PEFT would put this adapter's LoRA on `module` (a name like `model.layers.0.mlp.up_proj`)."""
        settings = self.settings
        if settings.exclude_modules and self._names(settings.exclude_modules, module, "exclude_modules"):
            return False
        if isinstance(settings.target_modules, str):
            return self._match(settings.target_modules, module, "target_modules", full=True)
        if module in settings.target_modules:
            return True
        if not any(module.endswith(f".{name}") for name in settings.target_modules):
            return False
        return self._in_layers(module)

    def _in_layers(self, module: str) -> bool:
        layers = self.settings.layers_to_transform
        if layers is None:
            return True
        patterns = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in self.settings.layers_pattern]
        found = None
        for pattern in patterns or [r".*?\.[^.]*\.(?P<idx>\d+)\."]:  # no pattern: the first numbered segment
            found = self._search(pattern, module, "layers_pattern")
            if found is not None:
                break
        if found is None:
            return False
        index = int(found["idx"])
        return index == layers if isinstance(layers, int) else index in layers

    def _lookup(self, patterns: dict[str, float], module: str, default: float, field: str) -> float:
        for key, value in patterns.items():  # the first key that matches a dotted suffix wins
            if self._match(rf"(.*\.)?({key})$", module, field):
                return value
        return default

    def rank(self, module: str) -> int:
        return int(self._lookup(self.settings.rank_pattern, module, self.settings.rank, "rank_pattern"))

    def alpha(self, module: str) -> float:
        return float(self._lookup(self.settings.alpha_pattern, module, self.settings.alpha, "alpha_pattern"))

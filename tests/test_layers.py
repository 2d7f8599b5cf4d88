"""The package's layers import downwards only, and no module-level import cycle exists.

From the bottom: foundations (errors, config, tenancy, interpreter) and the PEFT adapter format
(`lora/`, a leaf); the engine (`engine/`, which owns the device slots); the service layer above it
(`service/`: the store and the catalog); the HTTP API (`api/`) and the entry points on top. Read
from the source with `ast`, so a new import that breaks the order fails here, naming the file.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "server" / "loraplex"

# What each layer must not import (module-level or inside functions alike).
FORBIDDEN = {
    "loraplex.lora": ("loraplex.engine", "loraplex.service", "loraplex.api", "loraplex.server", "loraplex.cli"),
    "loraplex.engine": ("loraplex.service", "loraplex.api", "loraplex.server", "loraplex.cli"),
    "loraplex.service": ("loraplex.api", "loraplex.server", "loraplex.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("loraplex")}


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below_it(layer):
    offenders = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name == layer or name.startswith(layer + ".")
        for target in imports(path, top_level_only=False)
        if target.startswith(FORBIDDEN[layer])
    ]
    assert not offenders, offenders


def test_no_module_level_import_cycle():
    graph = {name: {target for target in imports(path, top_level_only=True) if target in MODULES} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(target) :], target]))
            if target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])

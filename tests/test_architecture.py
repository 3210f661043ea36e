"""The layers of docs/architecture.md, held by reading every import (module-level and inside functions) of
src/posttrain with ``ast``: pure maths imports only torch and the standard library; each layer imports only the
layers below it (the data layer and the world never import a stage); no import cycle between modules; the source
never uses a module's first (moved) path."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import posttrain

ROOT = Path(posttrain.__file__).resolve().parent

# layer -> the posttrain layers it may import (itself included)
ALLOWED = {
    "maths": {"maths"},
    "data": {"data", "maths"},
    "plumbing": {"plumbing", "data", "maths"},
    "models": {"models", "plumbing", "data", "maths"},
    "world": {"world", "models", "plumbing", "data", "maths"},
    "rewards": {"rewards", "world", "models", "plumbing", "data", "maths"},
    "stages": {"stages", "rewards", "world", "models", "plumbing", "data", "maths"},
    "cli": {"stages", "rewards", "world", "models", "plumbing", "data", "maths"},
    "classic": {"classic", "maths"},
    "__init__": set(),
}
PURE_EXTERNAL = {"torch", "__future__"} | set(sys.stdlib_module_names)


def module_name(path: Path) -> str:
    parts = ("posttrain",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``module``: ``from a.b import c`` names ``a.b.c`` when that is a
    module of ours, else ``a.b``; relative imports are resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in MODULES else base, node.lineno))
    return found


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in imports(module):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in MODULES} <= set(ALLOWED)
    assert {"posttrain.maths.direct", "posttrain.stages.sft", "posttrain.plumbing.harness",
            "posttrain.models.logprobs", "posttrain.world.evaluate"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layer_rules(module):
    here = layer(module)
    for target, line in imports(module):
        top = target.split(".")[0]
        if target == "posttrain":  # the root package: the version and the moved-module finder, nothing heavy
            continue
        if top == "posttrain":
            assert target not in posttrain.MOVED_MODULES, f"{module}:{line} imports the old path {target}"
            assert target in MODULES, f"{module}:{line}: no module {target}"
            assert layer(target) in ALLOWED[here], f"{module}:{line}: the {here} layer may not import {target}"
        elif here == "maths":
            assert top in PURE_EXTERNAL, f"{module}:{line}: pure maths imports only torch, not {target}"


def test_no_import_cycles():
    edges = internal_edges()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_the_checker_sees_function_level_imports_and_relative_ones():
    """Guards the guard: the world's relative imports and the stages' imports inside functions are read."""
    assert ("posttrain.world.tasks", 1) not in imports("posttrain.world.gold")  # lines are real line numbers
    assert any(t == "posttrain.world.tasks" for t, _ in imports("posttrain.world.gold"))
    assert "posttrain.stages.pretrain" in internal_edges()["posttrain.stages.world"]  # inside a function


def test_first_module_paths_still_import_as_the_same_modules():
    import importlib

    for old, new in posttrain.MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from posttrain.data import render_conversation, render_prompt  # noqa: F401
    from posttrain.losses import dpo_loss  # noqa: F401
    from posttrain.sampling import pass_at_k, select_top_k, select_top_per_prompt  # noqa: F401

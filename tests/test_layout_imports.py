"""The packages' layout: no module imports itself back through others, not even for type checking.

A circle of imports (a -> b -> a) makes the modules one piece that can only be read, changed and tested
together, and an import under `if TYPE_CHECKING:` is still such a tie, one that only the type checker
sees. Every `import` and `from ... import` of a module of the same package counts here, wherever it
stands (at the top, in a TYPE_CHECKING block, in a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("vllm_gateway", "vllm_simulator", "vllm_fleet")


def module_names(package: str) -> dict[str, Path]:
    return {path.stem if path.stem != "__init__" else package: path for path in (REPO_ROOT / package).glob("*.py")}


def imported_modules(package: str, tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """The modules of `package` that `tree` imports (`from . import x` names module x when there is one)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    found.add(parts[1] if len(parts) > 1 else package)
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # above the package: not one of its modules
            if node.level == 1:
                target = node.module
            elif node.module is not None and node.module.split(".")[0] == package:
                target = node.module.partition(".")[2] or None
            else:
                continue
            if target is None:  # `from . import x`: module x, or a name of the package's __init__
                found.update(alias.name if alias.name in modules else package for alias in node.names)
            else:
                found.add(target.split(".")[0])
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    modules = module_names(package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(package, tree, modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle is not None:
            return cycle
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_of_a_package_imports_itself_back(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 1
    cycle = find_cycle(graph)
    assert cycle is None, f"{package}: an import circle: {' -> '.join(cycle)}"


def test_the_circle_finder_finds_a_type_checking_import() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
    modules = {"a": Path("a.py"), "b": Path("b.py")}
    graph = {"a": {"b"}, "b": imported_modules("pkg", ast.parse(source), modules)}
    assert find_cycle(graph) == ["a", "b", "a"]

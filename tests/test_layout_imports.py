"""The packages' layout: no module imports itself back through others, not even for type checking.

A circle of imports (a -> b -> a) makes the modules one piece that can only be read, changed and tested
together, and an import under `if TYPE_CHECKING:` is still such a tie, one that only the type checker
sees. Every `import` and `from ... import` of a module of the same package counts here, wherever it
stands (at the top, in a TYPE_CHECKING block, in a function).
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("vllm_gateway", "vllm_simulator", "vllm_fleet")


def module_names(package: str, root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every module of `package`, its sub-packages' too, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(module: str, is_package: bool, tree: ast.Module, modules: Collection[str]) -> set[str]:
    """The modules of `modules` that `tree`, the source of `module`, imports, wherever the import stands.

    `from .x import y` names module x.y when there is one, else x; an import of a sub-package's module
    counts as one of that module, not of the package above it."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    here = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                if node.level - 1 >= len(base):
                    continue  # above the packages: none of their modules
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in map(known, targets) if target is not None)
    return found


def import_graph(package: str, root: Path = REPO_ROOT) -> dict[str, set[str]]:
    modules = module_names(package, root)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(name, path.stem == "__init__", tree, modules) - {name}
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
    modules = {"pkg.a", "pkg.b"}
    graph = {"pkg.a": {"pkg.b"}, "pkg.b": imported_modules("pkg.b", False, ast.parse(source), modules)}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_the_circle_finder_walks_sub_packages(tmp_path: Path) -> None:
    """A circle through a sub-package's module, written in each of the ways an import can name it."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "top.py").write_text("from .sub.inner import thing\n")
    (package / "sub" / "inner.py").write_text("def f():\n    from .. import top\n")
    (package / "sub" / "other.py").write_text("import pkg.sub.inner\nfrom . import inner\n")
    graph = import_graph("pkg", tmp_path)
    assert graph["pkg.sub.other"] == {"pkg.sub.inner"}
    assert find_cycle(graph) == ["pkg.sub.inner", "pkg.top", "pkg.sub.inner"]


def test_the_layout_covers_the_gateway_sub_packages() -> None:
    graph = import_graph("vllm_gateway")
    assert {"vllm_gateway.server.protocol", "vllm_gateway.admission.shared"} <= graph.keys()
    assert "vllm_gateway.server.exchange" in graph["vllm_gateway.server.protocol"]

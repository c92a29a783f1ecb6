"""Every module of primaps_dist imports, and no two modules of the package import each other (directly or
through others).

The import graph is read from the source with ``ast``: every ``import`` statement counts, also the ones inside
functions (a lazy import only hides a cycle until the function runs), except those under
``if TYPE_CHECKING:``. An edge goes to the most specific module named: ``from primaps_dist.em import stats``
is an edge to ``primaps_dist.em.stats`` when that is a module, ``from primaps_dist.em import stats_step`` an
edge to the package ``primaps_dist.em`` (its ``__init__``). Importing a submodule also runs its parent
packages' ``__init__``; those implicit edges are left out, since every package that re-exports its
submodules would otherwise form a cycle with each of them.
"""

from __future__ import annotations

import ast
import importlib
import textwrap
from pathlib import Path

import pytest

import primaps_dist

PACKAGE_ROOT = Path(primaps_dist.__file__).resolve().parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under the package folder ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of a module, descending into functions and classes but not TYPE_CHECKING blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` (see the module docstring for the rules)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: resolved against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                # "import a.b.c" names a.b.c; keep the longest prefix that is a module of the package.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, each as a sorted list (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_primaps_dist_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT, "primaps_dist")
    assert len(graph) > 50 and "primaps_dist.train" in graph  # the whole package was read
    assert "primaps_dist.evaluate" in graph["primaps_dist.train"]  # edges are found
    cycles = find_cycles(graph)
    assert not cycles, "import cycles inside primaps_dist: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_module_imports():
    names = [name for name in module_files(PACKAGE_ROOT, "primaps_dist") if not name.endswith("__main__")]
    for name in names:
        importlib.import_module(name)


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


@pytest.mark.parametrize(
    "files, expected",
    [
        # train <-> evaluate, one side importing lazily inside a function (as train.py once did)
        ({"__init__.py": "", "train.py": "def run():\n    from pkg.evaluate import score\n",
          "evaluate.py": "from pkg import train\n"}, [["pkg.evaluate", "pkg.train"]]),
        # a three-module ring through a relative import and a subpackage
        ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "import pkg.sub.c\n",
          "sub/__init__.py": "", "sub/c.py": "from ..a import thing\n"}, [["pkg.a", "pkg.b", "pkg.sub.c"]]),
        # a submodule importing a name from its own package's __init__, which imports the submodule
        ({"__init__.py": "from pkg.kmeans import step\n", "kmeans.py": "from pkg import helper\n"},
         [["pkg", "pkg.kmeans"]]),
    ],
)
def test_cycle_detector_finds_synthetic_cycles(tmp_path, files, expected):
    root = _write_package(tmp_path, files)
    assert find_cycles(import_graph(root, "pkg")) == expected


def test_cycle_detector_ignores_type_checking_and_parent_packages(tmp_path):
    root = _write_package(tmp_path, {
        "__init__.py": "from pkg.em import stats\n",
        "em/__init__.py": "from pkg.em.stats import step\n",
        "em/stats.py": "from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    from pkg import train\n",
        "train.py": "from pkg.em.stats import step\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.train"] == {"pkg.em.stats"} and graph["pkg.em.stats"] == set()
    assert find_cycles(graph) == []

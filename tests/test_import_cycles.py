"""No import cycle among the project's modules (nitp_kernels, engine, benchmarks).

The graph is built statically with ast, so modules that import lazily (inside a function, to keep
start-up fast) are checked as well: a function-level import that closes a cycle still makes the
two modules depend on each other. Imports under ``if TYPE_CHECKING:`` are left out: they never run.

An edge goes to the module an import names: ``from engine.model.layers import MLP`` to
engine.model.layers, ``from engine.data import build_data`` to the package engine.data (its
__init__), ``from . import hf`` to the submodule. The parent packages Python initialises on the
way are not edges: a package's __init__ importing its own submodules is no cycle, a submodule
importing names back from its package's __init__ is.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nitp_kernels", "engine", "benchmarks")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given package folders."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth (module, class, function), except TYPE_CHECKING blocks."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif not _is_type_checking_block(node):
            stack.extend(ast.iter_child_nodes(node))
    return found


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest dotted prefix of `name` that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (_known_prefix(a.name, modules) for a in node.names)))
                continue
            if node.level:  # relative: from the current package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else _known_prefix(base, modules)
                if target:
                    targets.add(target)
        targets.discard(name)  # `from engine.data import x` inside engine/data/__init__.py itself
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) for each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_within(graph, set(c), c[0]) for c in components]


def _cycle_within(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (BFS)."""
    parent: dict[str, str] = {}

    def path_from_start(v: str) -> list[str]:
        path = [v]
        while path[-1] != start:
            path.append(parent[path[-1]])
        return path[::-1]

    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return path_from_start(v) + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")


def test_project_has_no_import_cycle():
    modules = module_files(REPO, PACKAGES)
    graph = import_graph(modules)
    # the graph is really built: a few edges the code is known to have
    assert "engine.model.layers" in graph["engine.model.moe"]
    assert "engine.data.corpus" in graph["engine.data.build"]  # a function-level import
    assert "nitp_kernels.api" in graph["nitp_kernels"]  # a relative import
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_checker_finds_module_and_function_level_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g()\n")
    (pkg / "b.py").write_text("from . import a\n\ndef g():\n    return 1\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import h\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from pkg.sub import h\n\ndef h():\n    return 2\n")
    (pkg / "d.py").write_text("import pkg.e\n")
    (pkg / "e.py").write_text("from pkg import d\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.sub"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == set()  # TYPE_CHECKING only
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]

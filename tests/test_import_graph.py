"""The import graph of ``diffalign/``: no cycles, and the layers run one way.

Every module under ``diffalign/`` is parsed with :mod:`ast` (nothing is imported), and each
``import diffalign.X`` / ``from diffalign.X import Y`` / relative import becomes an edge to the
``diffalign`` module it names (``from P import name`` is an edge to the submodule ``P.name`` when
there is one, else to ``P``). Edges are of three kinds:

- ``module``: executed when the module is imported (module level, class bodies);
- ``function``: inside a function or lambda, executed when it is called;
- ``type-checking``: under ``if TYPE_CHECKING:``, never executed.

What is checked:

1. no cycle among ``module`` edges (an import-time cycle);
2. no cycle among ``module`` + ``function`` edges either (a dependency cycle hidden in a function
   is still a cycle);
3. layer rules over all three kinds: models/ imports nothing from trainers/, eval/, data/ (nor
   rewards/, shapes/, text/); core/ and objectives/ nothing from trainers/, eval/, data/ (nor
   rewards/, shapes/, text/); eval/, data/ and rewards/ nothing from trainers/; data/ and rewards/
   nothing from eval/; and only ``diffalign.cli`` imports a command-line module (``*.cli``).

An implicit "importing ``a.b`` runs ``a/__init__``" edge is not counted: a package's ``__init__``
re-exporting its submodules is the normal shape, and counting both directions would make every
such package a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffalign"

MODULE, FUNCTION, TYPE_CHECKING = "module", "function", "type-checking"

# package -> packages it must not import (any edge kind)
FORBIDDEN = {
    "models": {"trainers", "eval", "data", "rewards", "shapes", "text"},
    "core": {"trainers", "eval", "data", "rewards", "shapes", "text"},
    "objectives": {"trainers", "eval", "data", "rewards", "shapes", "text", "models", "core"},
    "eval": {"trainers"},
    "data": {"trainers", "eval"},
    "rewards": {"trainers", "eval"},
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` of every module under diffalign/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def import_edges() -> dict[str, dict[str, set[str]]]:
    """``{module: {imported diffalign module: {edge kinds}}}``."""
    modules = _modules()

    def known(name: str) -> str | None:  # the longest diffalign module prefix of ``name``
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, dict[str, set[str]]] = {m: {} for m in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]

        def add(target: str | None, kind: str, name=name) -> None:
            if target is not None and target != name:
                edges[name].setdefault(target, set()).add(kind)

        def visit(node: ast.AST, kind: str) -> None:
            for child in ast.iter_child_nodes(node):
                child_kind = kind
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == MODULE:
                    child_kind = FUNCTION
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name.split(".")[0] == "diffalign":
                            add(known(alias.name), kind)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = here[:len(here) - (child.level - 1)]
                        source = ".".join(base + ([child.module] if child.module else []))
                    else:
                        source = child.module or ""
                    if source.split(".")[0] == "diffalign":
                        for alias in child.names:
                            full = f"{source}.{alias.name}"
                            add(full if full in modules else known(source), kind)
                elif isinstance(child, ast.If) and _is_type_checking(child.test):
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), TYPE_CHECKING)
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), kind)
                    continue
                visit(child, child_kind)

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), MODULE)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _graph(edges, kinds: set[str]) -> dict[str, set[str]]:
    return {a: {b for b, k in targets.items() if k & kinds} for a, targets in edges.items()}


def _show(cycle: list[str], edges) -> str:
    return "\n  ".join(f"{a} -> {b} ({', '.join(sorted(edges[a][b]))})" for a, b in zip(cycle, cycle[1:]))


@pytest.fixture(scope="module")
def edges():
    return import_edges()


def test_the_graph_sees_the_package(edges):
    assert "diffalign.trainers.loop" in edges and "diffalign.models.loading" in edges
    assert "diffalign.trainers.config" in edges["diffalign.trainers.loop"]
    assert MODULE in edges["diffalign.eval.scoring"]["diffalign.data.generated"]
    # a cycle is found and shown
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_time_cycle(edges):
    cycle = find_cycle(_graph(edges, {MODULE}))
    assert cycle is None, "module-level import cycle:\n  " + _show(cycle, edges)


def test_no_cycle_with_function_level_imports(edges):
    cycle = find_cycle(_graph(edges, {MODULE, FUNCTION}))
    assert cycle is None, "import cycle (counting imports inside functions):\n  " + _show(cycle, edges)


def test_layers_run_one_way(edges):
    bad = []
    for a, targets in edges.items():
        layer = a.split(".")[1] if a.count(".") else ""
        for b, kinds in targets.items():
            other = b.split(".")[1] if b.count(".") else ""
            if other in FORBIDDEN.get(layer, ()):
                bad.append(f"{a} -> {b} ({', '.join(sorted(kinds))})")
    assert not bad, "imports against the layers:\n  " + "\n  ".join(sorted(bad))


# the applications above the registry: what may import it (it imports every method and trainer)
REGISTRY_USERS = {"diffalign.trainers", "diffalign.trainers.cli", "diffalign.trainers.bench",
                  "diffalign.trainers.encode", "diffalign.shapes.demo", "diffalign.shapes.curve",
                  "diffalign.shapes.efficacy",
                  "diffalign.text.cli", "diffalign.text.shapes"}


def test_the_registry_is_above_the_engine(edges):
    """cli → registry → engine: no method, loop or data module imports the registry back."""
    bad = [a for a, targets in edges.items() if "diffalign.trainers.registry" in targets and a not in REGISTRY_USERS]
    assert not bad, f"below the registry, yet importing it: {sorted(bad)}"


def test_only_the_cli_imports_command_line_modules(edges):
    entry = {"diffalign.cli", "diffalign.__main__"}  # `python -m diffalign` is the same command line
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if (b == "diffalign.cli" or b.endswith(".cli")) and a not in entry]
    assert not bad, "a library module imports a command-line module:\n  " + "\n  ".join(sorted(bad))

"""The import graph of ``mechir/``, ``patching/`` and ``analyses/``: no circles, no upward edges.

The graph is read from the source with :mod:`ast` (nothing is imported). An edge ``a -> b`` is
any ``import`` or ``from ... import`` statement in module ``a`` that names module ``b`` (or a
name defined in ``b``): at module level, inside functions and classes, and under
``if TYPE_CHECKING:`` alike, since a lazy import inside a function is still a dependency and
a circle through one only waits for the first call to bite. Not edges: the implicit import of
a module's parent packages (``mechir.models.bert`` runs ``mechir/models/__init__.py`` first;
Python resolves that order itself) and modules named as strings to :mod:`importlib` (the family
registry's ``Family.implementation()``, the lazy ``__getattr__`` of ``mechir/__init__.py``),
which load a module by name on purpose.

Rules:
    * no cycle among modules (a strongly connected component of more than one module);
    * layers point down only: ``analyses -> patching -> mechir``; ``mechir`` never imports
      ``patching`` or ``analyses``, ``patching`` never imports ``analyses``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The three layers, lowest first.
LAYERS = ("mechir", "patching", "analyses")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    found: dict[str, tuple[Path, bool]] = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            package = parts[-1] == "__init__"
            if package:
                parts = parts[:-1]
            found[".".join(parts)] = (path, package)
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that defines ``name`` (a module or a name inside one), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> Iterator[str]:
    """The modules of ours an import statement loads."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if owner := _owner(alias.name):
                yield owner
        return
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    if submodules:
        yield from submodules
    elif owner := _owner(source):
        yield owner


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (anywhere in its file)."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in MODULES.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in _imported(node, package) if t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_every_kind_of_import():
    """The reader is not blind: it finds known edges of each form (absolute, relative,
    inside a function), so an empty answer below means no circle, not no edges."""
    graph = import_graph()
    assert "mechir.models.registry" in graph["mechir.models.encoder"]  # module level
    assert "mechir.loading" in graph["mechir.models.encoder"]  # inside a function
    assert "mechir.running" in graph["mechir.hooks.attention"]
    assert any(graph[m] for m in MODULES if m.startswith("analyses."))


def test_cycles_are_found():
    """The cycle finder itself, on a graph with one circle and a tail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (each line one circle): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_imports_point_down_only():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        for b in targets
        if rank[b.split(".")[0]] > rank[a.split(".")[0]]
    )
    assert not upward, (
        "imports must point down (analyses -> patching -> mechir); upward: " + ", ".join(upward)
    )

"""The repository's modules import each other without a cycle, lazy imports included.

A cycle between two modules means neither can be read, tested or replaced alone, and a
lazy ``import`` inside a function only hides it from the interpreter, not from the reader.
So the graph here is built from the source with ``ast``: every ``import`` and ``from ...
import`` of a repository module, at module level or inside a function, is an edge (imports
under ``if TYPE_CHECKING:`` are left out: they never run). ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). Importing
``pkg.mod`` also runs ``pkg/__init__.py``, but that implicit edge is not counted: a package
that re-exports its own submodules is not a design cycle.

Inside ``depthlens`` the sub-packages (its rooms) are stacked in ``LAYERS``, bottom first, as
docs/extending.md draws them: a module may import its own room and the rooms below it, never
one above (a lazy import counts too).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("depthlens", "probes", "analyses", "finetune", "figures")
# depthlens's rooms, bottom first: each imports only itself and the rooms before it (docs/extending.md)
LAYERS = ("infra", "stats", "data", "models", "runtime", "judges", "attacks", "interventions", "cli")


def module_name(path: Path, root: Path) -> str:
    """``depthlens/models/load.py`` → ``depthlens.models``; ``figures/__init__.py`` → ``figures``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run: module level or in a function, not under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """``{module: {repository modules it imports}}`` for every ``.py`` file under ``packages``."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a non-module attribute path
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_repository_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and graph["analyses.evaluate"]  # the walk found the modules and their imports
    found = cycles(graph)
    assert found == [], "import cycles (lazy imports included): " + "; ".join(" ↔ ".join(c) for c in found)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("lazy", [False, True])
def test_a_planted_cycle_is_found(tmp_path, lazy):
    """a → b at module level, b → a at module level or hidden in a function: both are cycles."""
    back = "def f():\n    from pkg.a import x\n    return x\n" if lazy else "from pkg.a import x\n"
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\nx = 1\n",
        "pkg/b.py": back,
        "pkg/c.py": "import pkg.a\n",
    })
    graph = import_graph(root, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_relative_imports_and_three_module_cycles_are_found(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "from .a import x\n",
        "pkg/a.py": "from .sub.b import y\nx = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from ..c import z\ny = 2\n",
        "pkg/c.py": "def g():\n    import pkg.a\n",
    })
    graph = import_graph(root, ("pkg",))
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_acyclic_graphs_and_type_checking_imports_pass(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import y\nx = 1\n",
        "pkg/b.py": "from pkg.a import x\nimport os\ny = x\n",
    })
    graph = import_graph(root, ("pkg",))
    assert graph == {"pkg": set(), "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert cycles(graph) == []


def room(module: str, top: str = "depthlens") -> str | None:
    """``depthlens.models.load`` → ``models``; ``depthlens.stats`` → ``stats``; ``depthlens`` itself → None."""
    parts = module.split(".")
    return parts[1] if parts[0] == top and len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS,
                   top: str = "depthlens") -> list[str]:
    """Every import from a room to a room above it (or to a room ``layers`` does not name), as ``a -> b``."""
    rank = {name: i for i, name in enumerate(layers)}
    bad = []
    for src, targets in sorted(graph.items()):
        a = room(src, top)
        if a is None:
            continue
        for dst in sorted(targets):
            b = room(dst, top)
            if b is None and dst.split(".")[0] == top:
                bad.append(f"{src} -> {dst} (the package root)")
            elif b is not None and (a not in rank or b not in rank or rank[b] > rank[a]):
                bad.append(f"{src} -> {dst}")
    return bad


def test_every_core_module_lives_in_a_documented_room():
    graph = import_graph(ROOT)
    rooms = {room(m) for m in graph if room(m) is not None}
    assert rooms == set(LAYERS), f"rooms on disk {sorted(rooms)} differ from LAYERS {list(LAYERS)}"
    drawn = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    assert " < ".join(LAYERS) in drawn, "docs/extending.md must state the layer order LAYERS holds"


def test_the_core_rooms_import_only_downward():
    graph = import_graph(ROOT)
    assert graph["depthlens.attacks.plumbing"] & {m for m in graph if m.startswith("depthlens.judges")}  # edges were read
    bad = upward_imports(graph)
    assert bad == [], "imports from a lower room of depthlens to a higher one: " + "; ".join(bad)


def test_an_upward_import_is_found_lazy_or_not(tmp_path):
    root = _plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.a import x\n",
        "pkg/low/a.py": "x = 1\ndef f():\n    from pkg.high.b import y\n    return y\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from pkg.low.a import x\ny = x\n",
        "pkg/side.py": "import pkg.high.b\n",
    })
    graph = import_graph(root, ("pkg",))
    assert upward_imports(graph, ("low", "high", "side"), top="pkg") == ["pkg.low.a -> pkg.high.b"]
    assert upward_imports(graph, ("low", "high"), top="pkg") == ["pkg.low.a -> pkg.high.b",
                                                                 "pkg.side -> pkg.high.b"]  # side: no room
    assert upward_imports(graph, ("high", "low", "side"), top="pkg") == ["pkg.high.b -> pkg.low.a"]

"""The package's shape, as issue 15 asked for it: no import cycle (counting imports made inside
functions, which only hide a cycle), no module over about 400 lines, no class over about 300,
and a docstring saying what each module owns."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "watcher"
MODULE_LINES = 420  # "about 400"
CLASS_LINES = 320  # "about 300"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    """The package's modules ``tree`` imports anywhere (functions included), outside
    ``if TYPE_CHECKING:`` blocks; ``from a import b`` counts as ``a.b`` when that is a module."""
    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                stack.extend(child.orelse)  # the else branch runs
                continue
            if isinstance(child, ast.Import):
                found |= {owner(a.name) for a in child.names if a.name.startswith("watcher")}
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and \
                    (child.module or "").startswith("watcher"):
                for a in child.names:
                    full = f"{child.module}.{a.name}"
                    found.add(full if full in mods else owner(child.module or ""))
            stack.append(child)
    return found - {""}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: imports_of(ast.parse(path.read_text()), mods) - {name}
            for name, path in mods.items()}


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_an_import_inside_a_function() -> None:
    mods = {"watcher.a": Path("a"), "watcher.b": Path("b"), "watcher.c": Path("c")}
    a = ast.parse("from watcher import b\n")
    b = ast.parse("def f():\n    from watcher.c import thing\n")
    c = ast.parse("import typing\nif typing.TYPE_CHECKING:\n    import watcher.b\n"
                  "import watcher.a\n")
    graph = {"watcher.a": imports_of(a, mods), "watcher.b": imports_of(b, mods),
             "watcher.c": imports_of(c, mods)}
    assert graph == {"watcher.a": {"watcher.b"}, "watcher.b": {"watcher.c"},
                     "watcher.c": {"watcher.a"}}
    assert cycles(graph) == [["watcher.a", "watcher.b", "watcher.c"]]
    graph["watcher.c"] = set()
    assert cycles(graph) == []


def test_no_module_or_class_is_too_long_and_each_module_says_what_it_owns() -> None:
    long_modules, long_classes, undocumented = [], [], []
    for name, path in _modules().items():
        text = path.read_text()
        tree = ast.parse(text)
        if len(text.splitlines()) > MODULE_LINES:
            long_modules.append((name, len(text.splitlines())))
        if name.count(".") and not ast.get_docstring(tree) and text.strip():
            undocumented.append(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > CLASS_LINES:
                    long_classes.append((f"{name}.{node.name}", size))
    assert long_modules == []
    assert long_classes == []
    assert undocumented == []

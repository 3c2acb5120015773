"""The import contract of hostprep/ (DESIGN.md: arrows point one way).

Every import of every module counts, at any depth of the file (a function-level
import hides a cycle from Python, not from this test).  Three rules:

1. no import cycle between hostprep's modules;
2. the pure core (model, render, plan, observed and what they import) never imports a
   module that touches the host: none of hostprep's own (runner, backend, engine,
   txn, ...), none of the standard library's process/socket/lock modules, and it
   calls no ``os.system``-like function;
3. the layers of the flow keep their order: cli above ops above txn above engine
   above backend above runner; a module imports only its own layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hostprep"

# The pure core, and what it may import of hostprep (data: where the templates are).
PURE = {"model", "render", "plan", "observed"}
PURE_MAY_IMPORT = PURE | {"errors", "validate", "data"}
# Standard library and third-party modules that touch the host.
HOST_LIBS = {"subprocess", "socket", "shutil", "fcntl", "signal", "ctypes", "psutil", "pty", "select",
             "multiprocessing", "threading", "scapy", "tempfile"}
HOST_CALLS = {"system", "popen", "execv", "execve", "execvp", "spawnv", "spawnl", "kill", "fork", "unlink",
              "remove", "rename", "replace", "open", "write"}

# Higher numbers sit above lower ones (shared/DESIGN.md's flow); a module may import
# modules of its own rank or lower.  Unranked modules take part in rule 1 only.
RANK = {
    "runner": 1,
    "backend": 2,
    "engine": 3,
    "snapshot": 4, "txn": 4, "timers": 4,
    "ops": 5, "status": 5,
    "cli": 6,
    "entry": 7, "__main__": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts) or "__init__"


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def own_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """hostprep modules ``name`` imports (anywhere in the file), by their names under hostprep."""
    package = name.split(".")[:-1] if "." in name else []
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {a.name.removeprefix("hostprep.") for a in node.names if a.name.startswith("hostprep.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: from . import x, from .x import y
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "hostprep" or (node.module or "").startswith("hostprep."):
                mod = node.module.removeprefix("hostprep").removeprefix(".")
            else:
                continue
            targets.add(mod)
            targets |= {f"{mod}.{a.name}" if mod else a.name for a in node.names}
    return {t for t in targets if t in known and t != name}


def external_imports(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: own_imports(name, tree, known) for name, tree in trees.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def rank(name: str) -> int | None:
    return RANK.get(name, RANK.get(name.split(".")[0]))


def test_the_graph_is_read():
    g = graph()
    # a sanity check of the reader itself: these imports exist and must be seen
    assert "errors" in g["runner"]
    assert "model" in g["plan"]
    assert {"model", "errors"} <= g["render"] | {"errors"}


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("pure", sorted(PURE))
def test_the_pure_core_touches_no_host(pure):
    g = graph()
    trees = modules()
    reach: set[str] = set()
    todo = [pure]
    while todo:
        n = todo.pop()
        for m in g[n]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    assert sorted(reach - PURE_MAY_IMPORT) == []
    for n in {pure} | reach:
        assert sorted(external_imports(trees[n]) & HOST_LIBS) == [], n
        calls = sorted({node.func.attr for node in ast.walk(trees[n])
                        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
                        and node.func.attr in HOST_CALLS})
        assert calls == [], n


def test_layers_point_down():
    wrong = []
    for name, deps in graph().items():
        mine = rank(name)
        if mine is None:
            continue
        wrong += [f"{name} (layer {mine}) imports {d} (layer {rank(d)})" for d in sorted(deps)
                  if rank(d) is not None and rank(d) > mine]
    assert wrong == []


def test_a_cycle_is_found():
    """The checker itself can fail: a made-up cycle and a made-up clean graph."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_count():
    tree = ast.parse("def f():\n    from hostprep import txn\n    import hostprep.engine\n")
    assert own_imports("x", tree, {"txn", "engine", "x"}) == {"txn", "engine"}

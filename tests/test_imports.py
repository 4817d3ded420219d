"""The package's modules import one another without circles (module-level
and function-level imports alike), so each can be read and loaded on its own:
issue 26 found fastfair.ops and fastfair.wgrad importing each other."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import fastfair

ROOT = os.path.dirname(fastfair.__file__)


def _modules() -> dict[str, str]:
    mods = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the fastfair modules it imports anywhere in its source."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle() -> None:
    g = import_graph()
    g["fastfair.wgrad"].add("fastfair.ops.weight_grad")  # the circle issue 26 found
    assert any({"fastfair.wgrad", "fastfair.ops.weight_grad"} <= set(c) for c in cycles(g))


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Any entry point loads, whichever module a user imports first."""
    from concurrent.futures import ThreadPoolExecutor

    mods = sorted(m for m in _modules() if not m.endswith("__main__"))
    # Several modules per interpreter would hide an order dependence: one each,
    # a few interpreters at a time.
    code = "import importlib, sys; importlib.import_module(sys.argv[1])"

    def one(mod: str) -> tuple[str, int, str]:
        r = subprocess.run([sys.executable, "-c", code, mod], capture_output=True, text=True, timeout=600)
        return mod, r.returncode, r.stderr[-1500:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(m, err) for m, rc, err in pool.map(one, mods) if rc != 0]
    assert failed == [], failed

#!/usr/bin/env python
"""Import graph of the ``megatron_midtrain`` package: cycles and layering.

    python tools/import_graph.py            # prints every cycle (exit 1 if any) and the layer check

Every ``import`` statement counts, including the ones inside functions: a lazy import that
closes a circle still ties the two modules together (it only hides the circle until run time).
A module is a node; ``from a.b import c`` is an edge to ``a.b`` (or to ``a.b.c`` when that is a
module). Importing a submodule runs its package's ``__init__`` too, but that is Python's
mechanics, not a dependency the code chose, so it is not an edge.
"""

from __future__ import annotations

import ast
import os
import sys

PACKAGE = "megatron_midtrain"
#: Packages that must not import anything above them (``config`` sits at the bottom).
BOTTOM = {"config": {"config", "errors", "utils"}}


def modules(root: str) -> dict[str, str]:
    """``{dotted module name: path}`` for every .py file of the package under ``root``."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for folder, _, files in os.walk(base):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, name)
    return out


def edges(root: str) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod and t != PACKAGE:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a bottom package (``config``) into anything above it."""
    bad = []
    for mod, deps in sorted(graph.items()):
        parts = mod.split(".")
        if len(parts) < 2 or parts[1] not in BOTTOM:
            continue
        allowed = BOTTOM[parts[1]]
        for d in sorted(deps):
            top = d.split(".")[1] if "." in d else d
            if top not in allowed:
                bad.append(f"{mod} -> {d}")
    return bad


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    graph = edges(root)
    found = cycles(graph)
    bad = layer_violations(graph)
    n_edges = sum(map(len, graph.values()))
    print(f"{len(graph)} modules, {n_edges} import edges (function-level imports included)")
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    for line in bad:
        print("layer: " + line)
    if not found and not bad:
        print("no import cycles; config/ imports nothing above it")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())

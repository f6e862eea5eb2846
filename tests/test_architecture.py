"""The code's shape (issue 13): no import cycles, config/ at the bottom, modules of a readable size."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: A module may exceed ~400 lines only with a reason recorded here.
LINE_LIMIT = 420
OVER_LIMIT: dict[str, str] = {}


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", os.path.join(ROOT, "tools", "import_graph.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_and_config_at_the_bottom():
    graph_tool = _import_graph()
    graph = graph_tool.edges(ROOT)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was really read
    assert graph_tool.cycles(graph) == []
    assert graph_tool.layer_violations(graph) == []


def test_import_graph_finds_a_cycle():
    """The checker itself: a planted cycle is reported."""
    graph_tool = _import_graph()
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert graph_tool.cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_modules_are_of_a_readable_size():
    too_long = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "megatron_midtrain")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)
                with open(path) as fh:
                    n = sum(1 for _ in fh)
                if n > LINE_LIMIT and rel not in OVER_LIMIT:
                    too_long[rel] = n
    assert not too_long, f"modules over {LINE_LIMIT} lines: {too_long}"


def test_production_code_does_not_import_the_test_helpers():
    bad = []
    for top in ("megatron_midtrain", "tools"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if os.sep + "testing" in folder:
                continue
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name)) as fh:
                        if "megatron_midtrain.testing" in fh.read():
                            bad.append(os.path.relpath(os.path.join(folder, name), ROOT))
    assert not bad, f"production modules importing megatron_midtrain.testing: {bad}"

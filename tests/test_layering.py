"""The package's import structure: the layering that docs/architecture.md states, and no cycles.

Every `import` counts, at the top of a module or inside a function, except those under
`if TYPE_CHECKING:` (annotations only). Subpackages are ranked from the bottom (plain data
types) to the top (the command line); a module may import its own subpackage and anything it
is allowed below, never above.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenmill"

# The plain data types every layer shares: configs, request and output records, errors, and
# the package data (the calibration text).
TYPES = {
    "errors",
    "config",
    "config_checks",
    "sampling_params",
    "slo_params",
    "request",
    "outputs",
    "version",
    "data",
}

# What each part may import besides itself and TYPES. Read bottom-up: core is pure Python;
# structured compiles grammars and masks tokens (xgrammar); tools plans tool calls and reads them
# back out of text (pure Python); kernels bind the C++ and Triton
# code; quant stores and multiplies weights; layers build models; loader reads checkpoints
# into (name, tensor) streams; worker runs the model for a step; spec_decode drives a proposer
# (a draft model has its own worker); engine ties them; server speaks HTTP; the rest are entry
# points.
ALLOWED: dict[str, set[str]] = {
    "types": set(),
    "core": set(),
    "kernels": set(),
    "quant": {"kernels"},
    "layers": {"quant", "kernels"},
    "models": {"layers", "quant", "kernels"},
    "loader": {"models", "quant", "kernels"},
    "structured": {"kernels"},
    "tools": {"structured"},
    "sampling": {"core", "structured"},
    "worker": {"core", "sampling", "structured", "models", "layers", "quant", "kernels"},
    "spec_decode": {
        "core",
        "sampling",
        "structured",
        "worker",
        "loader",
        "models",
        "layers",
        "quant",
        "kernels",
    },  # fmt: skip
    "engine": {
        "tools",
        "core",
        "sampling",
        "structured",
        "spec_decode",
        "worker",
        "loader",
        "models",
        "layers",
        "quant",
        "kernels",
    },  # fmt: skip
    "server": {"engine", "core", "sampling", "structured", "tools"},
    "router": set(),  # an HTTP proxy over servers: no engine, no torch
    "sim": {"core"},  # the scheduler simulator: the real scheduler on simulated time
}
APP = {"cli", "cli_flags", "cli_commands", "__main__", "quantize", "testing", "(package)"}
NO_TORCH = {"core", "router"}


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "(package)"
    name = parts[1]
    return "types" if name in TYPES else name


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> tokenmill modules it imports, module -> third-party roots it imports)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod where there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]  # fmt: skip
            for target in targets:
                if target == "tokenmill" or target.startswith("tokenmill."):
                    while target not in files:  # `import tokenmill.x.y` of a package attribute
                        target = target.rpartition(".")[0]
                    if target != module:
                        graph[module].add(target)
                else:
                    external[module].add(target.split(".")[0])
    for module in files:
        graph.setdefault(module, set())
    return graph, external


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components of more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


GRAPH, EXTERNAL = import_graph()


def test_the_graph_sees_the_package() -> None:
    assert len(GRAPH) > 50
    assert "tokenmill.core.scheduler" in GRAPH["tokenmill.engine.engine"]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_go_downward(part: str) -> None:
    allowed = ALLOWED[part] | {part, "types"}
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if part_of(m) == part
        for t in targets
        if part_of(t) not in allowed
    )
    assert not bad, "\n".join(bad)


def test_every_part_is_ranked() -> None:
    unknown = {part_of(m) for m in GRAPH} - set(ALLOWED) - APP
    assert not unknown, f"add {sorted(unknown)} to ALLOWED in this test and docs/architecture.md"


def test_core_is_pure_python() -> None:
    bad = sorted(
        f"{m} imports {sorted(libs & {'torch', 'numpy', 'triton'})}"
        for m, libs in EXTERNAL.items()
        if part_of(m) in NO_TORCH and libs & {"torch", "numpy", "triton"}
    )
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules() -> None:
    assert not strongly_connected(GRAPH)


def test_no_import_cycle_between_parts() -> None:
    parts: dict[str, set[str]] = defaultdict(set)
    for m, targets in GRAPH.items():
        parts[part_of(m)].update(part_of(t) for t in targets if part_of(t) != part_of(m))
    assert not strongly_connected(parts)


def test_the_checker_finds_cycles_and_upward_imports() -> None:
    """The checks above would fail on a cycle or an upward import (a self-test of the parser
    on the real layout plus made-up edges)."""
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["tokenmill.core.block_pool"].add("tokenmill.core.scheduler")
    assert strongly_connected(graph)
    assert part_of("tokenmill.worker.model_runner") not in ALLOWED["layers"]

"""Imports point one way: every import in bitsmith (inside functions too) goes to its own layer or one below."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "bitsmith"

# Bottom to top (docs in README "Layout"). `base` is bitsmith/__init__.py and errors.py, which every layer uses;
# `top` is the driver: pipeline.py, cli.py and tools/.
LAYERS = ("base", "runtime", "compiler", "codegen", "passes", "search", "top")
# Third-party packages a layer must not import: the runtime deploys without torch; passes and the IR never
# touch TVM (codegen does).
FORBIDDEN = {"runtime": {"torch", "transformers"}, "compiler": {"tvm"}, "passes": {"tvm"}}


def layer_of(module: str) -> str:
    """bitsmith.runtime.executor -> runtime; bitsmith.errors -> base; bitsmith.pipeline -> top."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "errors":
        return "base"
    return parts[1] if parts[1] in LAYERS else "top"


def module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, wherever it sits; a `from X import Y`
    counts as X.Y when that is a module of the package."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in known else base, node.lineno))
    return found


def import_graph(root: Path) -> tuple[nx.DiGraph, list[tuple[str, str, int]]]:
    """(file-to-file graph inside the package, every (importer, imported, line) including third-party)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph, edges = nx.DiGraph(), []
    graph.add_nodes_from(files)
    for module, path in files.items():
        for target, line in imports_of(path, module, set(files)):
            edges.append((module, target, line))
            while target and target not in files and target.startswith(root.name + "."):
                target = target.rpartition(".")[0]  # a name imported from a module
            if target in files and target != module:
                graph.add_edge(module, target)
    return graph, edges


def layering_violations(root: Path) -> list[str]:
    """Every import that points up the layer order or at a forbidden package, and every import cycle."""
    graph, edges = import_graph(root)
    problems = []
    for importer, imported, line in edges:
        here = layer_of(importer)
        if imported.split(".")[0] == root.name:
            there = layer_of(imported)
            if LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{importer}:{line} imports {imported} ({here} -> {there}, up the order)")
        elif imported.split(".")[0] in FORBIDDEN.get(here, ()):
            problems.append(f"{importer}:{line} imports {imported}, which the {here} layer must not use")
    for cycle in nx.simple_cycles(graph):
        problems.append("import cycle: " + " -> ".join(cycle + cycle[:1]))
    return problems


def test_the_package_imports_one_way():
    assert layering_violations(PACKAGE_ROOT) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """A package shaped like bitsmith whose every import is allowed."""
    root = tmp_path / "bitsmith"
    _write(root, {"__init__.py": "", "errors.py": "", "runtime/__init__.py": "",
                  "runtime/kv.py": "import numpy\nfrom bitsmith.errors import *\n",
                  "compiler/__init__.py": "", "compiler/ir.py": "from bitsmith.runtime import kv\n",
                  "passes/__init__.py": "", "passes/p.py": "from ..compiler.ir import x\n",
                  "pipeline.py": "from bitsmith.passes import p\n"})
    return root


def test_checker_accepts_a_clean_tree(synthetic):
    assert layering_violations(synthetic) == []


def test_checker_finds_an_upward_import_inside_a_function(synthetic):
    (synthetic / "runtime" / "engine.py").write_text("def f():\n    from bitsmith.compiler.ir import x\n")
    (synthetic / "compiler" / "loader.py").write_text("from ..pipeline import compile_model\n")
    problems = layering_violations(synthetic)
    assert any("bitsmith.runtime.engine:2 imports bitsmith.compiler.ir (runtime -> compiler" in p for p in problems)
    assert any("bitsmith.compiler.loader:1 imports bitsmith.pipeline (compiler -> top" in p for p in problems)
    assert len(problems) == 2


def test_checker_finds_a_forbidden_package_and_a_cycle(synthetic):
    (synthetic / "runtime" / "kv.py").write_text("import torch\nfrom bitsmith.runtime import pool\n")
    (synthetic / "runtime" / "pool.py").write_text("def f():\n    from bitsmith.runtime.kv import x\n")
    problems = layering_violations(synthetic)
    assert "bitsmith.runtime.kv:1 imports torch, which the runtime layer must not use" in problems
    assert any(p.startswith("import cycle:") and "bitsmith.runtime.kv" in p and "bitsmith.runtime.pool" in p
               for p in problems)

"""IR verifier: SSA well-formedness and re-inferred types; every error names the function and node."""

from __future__ import annotations

from bitsmith.compiler.ir import Function, Module
from bitsmith.compiler.ops import OPS, infer_types
from bitsmith.errors import BitsmithError

ENTRY_INPUTS = ("tokens", "positions", "kv_cache")


def _fail(fn: Function, node_desc: str, problem: str) -> None:
    raise BitsmithError(problem, where=f"function {fn.name}, node {node_desc}", fix="fix the pass or frontend that built it")


def verify_function(fn: Function, module: Module) -> None:
    defined: set[str] = set()
    for name, ttype in fn.inputs:
        if name in defined:
            _fail(fn, f"input %{name}", "input defined twice")
        if fn.types.get(name) != ttype:
            _fail(fn, f"input %{name}", f"type table says {fn.types.get(name)}, signature says {ttype}")
        defined.add(name)
    for index, node in enumerate(fn.nodes):
        desc = f"#{index} %{node.name if node.outputs else '?'} ({node.op})"
        if not node.outputs:
            _fail(fn, desc, "node has no outputs")
        if node.op not in OPS:
            _fail(fn, desc, f"unknown op {node.op!r}")
        for value in node.inputs:
            if value not in defined:
                _fail(fn, desc, f"uses %{value} before it is defined")
        for value in node.outputs:
            if value in defined:
                _fail(fn, desc, f"redefines %{value} (not SSA)")
            if value not in fn.types:
                _fail(fn, desc, f"output %{value} has no type")
        if node.op == "weight" and node.attrs.get("name") not in module.weights:
            _fail(fn, desc, f"refers to weight {node.attrs.get('name')!r}, which the module does not have")
        try:
            inferred = infer_types(node.op, [fn.types[v] for v in node.inputs], node.attrs, module.weights,
                                   where=f"function {fn.name}, node {desc}")
        except BitsmithError as exc:
            raise BitsmithError(exc.problem, where=exc.where, fix="fix the pass or frontend that built it") from exc
        if len(inferred) != len(node.outputs):
            _fail(fn, desc, f"op gives {len(inferred)} outputs, node names {len(node.outputs)}")
        for value, ttype in zip(node.outputs, inferred):
            if fn.types[value] != ttype:
                _fail(fn, desc, f"%{value} is typed {fn.types[value]} but the op infers {ttype}")
        defined.update(node.outputs)
    for value in fn.outputs:
        if value not in defined:
            _fail(fn, f"return %{value}", "returns a value that is never defined")


def verify_module(module: Module) -> None:
    """Raise a BitsmithError naming the first malformed node; return None when the module is well formed."""
    for required in ("prefill", "decode"):
        if required not in module.functions:
            raise BitsmithError(f"module lacks the {required!r} entry point", fix="rebuild with a frontend")
    for fn in module.functions.values():
        names = tuple(n for n, _ in fn.inputs)
        if names != ENTRY_INPUTS:
            raise BitsmithError(f"entry inputs are {names}, expected {ENTRY_INPUTS}", where=f"function {fn.name}")
        verify_function(fn, module)

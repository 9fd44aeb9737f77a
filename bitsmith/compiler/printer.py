"""Stable text form of the IR (same module, same text), for --ir, --dump-ir and golden tests."""

from __future__ import annotations

import json

from bitsmith.compiler.ir import Function, Module, Node


def format_attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={json.dumps(attrs[k], sort_keys=True)}" for k in sorted(attrs)) + "}"


def format_node(fn: Function, node: Node) -> str:
    outs = ", ".join(f"%{o}" for o in node.outputs)
    args = ", ".join(f"%{i}" for i in node.inputs)
    types = ", ".join(str(fn.types[o]) for o in node.outputs)
    return f"{outs} = {node.op}({args}){format_attrs(node.attrs)} : {types}"


def print_function(fn: Function) -> str:
    params = ", ".join(f"%{n}: {t}" for n, t in fn.inputs)
    lines = [f"func @{fn.name}({params}) {{"]
    lines += [f"  {format_node(fn, node)}" for node in fn.nodes]
    lines.append(f"  return {', '.join('%' + o for o in fn.outputs)}")
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    lines = ["module {"]
    lines += [f"  weight {name}: {ttype}" for name, ttype in sorted(module.weights.items())]
    for name in sorted(module.functions):
        lines += ["  " + line for line in print_function(module.functions[name]).splitlines()]
    lines.append("}")
    return "\n".join(lines)


def op_histogram(fn: Function) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in fn.nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return dict(sorted(counts.items()))

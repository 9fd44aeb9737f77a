"""Fuse the tanh-approximate GELU spelled out in ops (`0.5*x*(1+tanh(c*(x+0.044715*x^3)))`) into `gelu`."""

from __future__ import annotations

import math

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.passes.rewrite import FunctionRewriter, TracedRewrite, is_scalar_const, map_functions, producers


def _split(node: Node | None, op: str, prod: dict[str, Node], value: float) -> str | None:
    """The other operand when `node` is `op(t, value)` or `op(value, t)` with a scalar constant."""
    if node is None or node.op != op:
        return None
    a, b = node.inputs
    if is_scalar_const(prod.get(b), value, 1e-4):
        return a
    if is_scalar_const(prod.get(a), value, 1e-4):
        return b
    return None


def _x_of_tanh_branch(value: str, prod: dict[str, Node]) -> str | None:
    """x when value is `1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))`."""
    t = _split(prod.get(value), "add", prod, 1.0)
    tanh = prod.get(t) if t else None
    if tanh is None or tanh.op != "tanh":
        return None
    inner = _split(prod.get(tanh.inputs[0]), "mul", prod, math.sqrt(2.0 / math.pi))
    add = prod.get(inner) if inner else None
    if add is None or add.op != "add":
        return None
    for x, cube in (add.inputs, add.inputs[::-1]):
        p = _split(prod.get(cube), "mul", prod, 0.044715)
        pw = prod.get(p) if p else None
        if pw is not None and pw.op == "pow" and float(pw.attrs["exponent"]) == 3.0 and pw.inputs[0] == x:
            return x
    return None


def _rewrite(fn: Function, module: Module) -> Function:
    prod = producers(fn)
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        rw.keep(node)
        if node.op != "mul":
            continue
        for half, branch in (node.inputs, node.inputs[::-1]):
            x = _split(prod.get(half), "mul", prod, 0.5)
            if x is not None and x == _x_of_tanh_branch(branch, prod) and fn.types[x] == fn.types[node.outputs[0]]:
                rw.replace(node.outputs[0], rw.emit("gelu", [x], hint=node.outputs[0], approximate="tanh"))
                break
    return rw.finish()


def fuse_gelu(module: Module) -> Module:
    return map_functions(module, _rewrite)


class FuseGelu(TracedRewrite):
    name = "fuse_gelu"

    def rewrite(self, module: Module) -> Module:
        return fuse_gelu(module)

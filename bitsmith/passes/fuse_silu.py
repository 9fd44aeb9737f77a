"""Fuse `x * sigmoid(x)` (how ONNX spells SiLU) into `silu`, so SwiGLU reads `mul(silu(gate), up)`."""

from __future__ import annotations

from bitsmith.compiler.ir import Function, Module
from bitsmith.passes.rewrite import FunctionRewriter, TracedRewrite, map_functions, producers


def _rewrite(fn: Function, module: Module) -> Function:
    prod = producers(fn)
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        rw.keep(node)
        if node.op != "mul":
            continue
        for x, s in (node.inputs, node.inputs[::-1]):
            sig = prod.get(s)
            same_type = fn.types[x] == fn.types[node.outputs[0]]  # not a broadcasting product
            if sig is not None and sig.op == "sigmoid" and sig.inputs[0] == x and same_type:
                rw.replace(node.outputs[0], rw.emit("silu", [x], hint=node.outputs[0]))
                break
    return rw.finish()


def fuse_silu(module: Module) -> Module:
    return map_functions(module, _rewrite)


class FuseSilu(TracedRewrite):
    name = "fuse_silu"

    def rewrite(self, module: Module) -> Module:
        return fuse_silu(module)

"""Fold `linear(x, w) + b` (ONNX's MatMul + Add) into `linear(x, w, b)` when b is a matching 1-D weight."""

from __future__ import annotations

from bitsmith.compiler.ir import Function, Module
from bitsmith.passes.rewrite import FunctionRewriter, TracedRewrite, consumers, map_functions, producers


def _rewrite(fn: Function, module: Module) -> Function:
    prod, users = producers(fn), consumers(fn)
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        rw.keep(node)
        if node.op != "add":
            continue
        for y, b in (node.inputs, node.inputs[::-1]):
            lin, bias = prod.get(y), prod.get(b)
            if lin is None or lin.op != "linear" or len(lin.inputs) != 2 or bias is None or bias.op != "weight":
                continue
            out_features = fn.types[lin.inputs[1]].shape[0]
            if fn.types[b].shape == (out_features,) and len(users.get(y, [])) == 1 and y not in fn.outputs:
                new = rw.emit("linear", [lin.inputs[0], lin.inputs[1], b], hint=node.outputs[0])
                rw.replace(node.outputs[0], new)
                break
    return rw.finish()


def fuse_linear_bias(module: Module) -> Module:
    return map_functions(module, _rewrite)


class FuseLinearBias(TracedRewrite):
    name = "fuse_linear_bias"

    def rewrite(self, module: Module) -> Module:
        return fuse_linear_bias(module)

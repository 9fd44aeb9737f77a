"""Derive the `decode` entry point from `prefill` by binding the symbolic `seq` dim to 1."""

from __future__ import annotations

from bitsmith.compiler.ir import Dim, Function, Module, Node, TensorType
from bitsmith.compiler.ops import infer_types
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass

SEQ = "seq"


def specialize(fn: Function, name: str, weights: dict[str, TensorType], seq: Dim = 1) -> Function:
    """`fn` with `seq` bound to `seq`: input types, shape attributes and every inferred type follow."""
    def bind(shape: tuple) -> tuple:
        return tuple(seq if d == SEQ else d for d in shape)

    inputs = tuple((n, TensorType(bind(t.shape), t.dtype)) for n, t in fn.inputs)
    types = dict(inputs)
    nodes = []
    for node in fn.nodes:
        attrs = dict(node.attrs)
        if "shape" in attrs:  # reshape / broadcast_to targets may name seq
            attrs["shape"] = [seq if d == SEQ else d for d in attrs["shape"]]
        out_types = infer_types(node.op, [types[v] for v in node.inputs], attrs, weights, where=f"{name}/{node.name}")
        types.update(zip(node.outputs, out_types))
        nodes.append(Node(node.op, node.inputs, node.outputs, attrs))
    return Function(name, inputs, tuple(nodes), fn.outputs, types)


def derive_decode(module: Module) -> Module:
    """Adds (or replaces) `decode` = `prefill` at one token per step."""
    return module.with_function(specialize(module["prefill"], "decode", module.weights))


class DeriveDecode(Pass):
    """The last canonicalizing step of a traced module: with `decode` beside `prefill` it is canonical."""

    name = "derive_decode"
    requires = frozenset({"traced"})
    provides = frozenset({"canonical"})
    invalidates = frozenset({"traced"})  # a pass that rewrites a traced prefill cannot run after this

    def run(self, module: Module, ctx: PassContext) -> Module:
        return derive_decode(module)

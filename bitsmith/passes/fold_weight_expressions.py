"""Fold arithmetic on weights and constants alone (Gemma's `1 + w` norm scale) into one precomputed weight."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.ir import Function, Module, Node, TensorType
from bitsmith.compiler.ops import OPS, RefContext
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.rewrite import consumers, producers

# elementwise and layout ops whose result on static inputs is static; matmuls stay (the weight is quantized as is)
FOLDABLE = ("add", "sub", "mul", "div", "neg", "cast", "pow", "sqrt", "rsqrt", "reshape")


def _static_roots(fn: Function, users: dict[str, list[Node]]) -> dict[str, Node]:
    """Foldable nodes whose inputs are all weights, constants or other such nodes, at least one weight below."""
    static, reads_weight = {}, set()
    for node in fn.nodes:
        if node.op in ("weight", "const"):
            static[node.outputs[0]] = node
            if node.op == "weight":
                reads_weight.add(node.outputs[0])
        elif node.op in FOLDABLE and node.inputs and all(v in static for v in node.inputs):
            static[node.outputs[0]] = node
            if any(v in reads_weight for v in node.inputs):
                reads_weight.add(node.outputs[0])
    # fold maximal expressions: a static value read by a non-static node (or an output)
    roots = {}
    for value, node in static.items():
        if node.op in ("weight", "const") or value not in reads_weight:
            continue
        if value in fn.outputs or any(u.outputs[0] not in static for u in users.get(value, [])):
            roots[value] = node
    return roots


def _weights_under(value: str, prod: dict[str, Node]) -> list[Node]:
    node = prod[value]
    if node.op == "weight":
        return [node]
    return [w for v in node.inputs for w in _weights_under(v, prod)]


def _folded_name(value: str, prod: dict[str, Node], users: dict[str, list[Node]],
                 weight_nodes: Counter) -> str:
    """The one weight the expression reads, when nothing else reads it (the folded value replaces it under its
    own name: `layers.0.input_layernorm.weight` holds 1 + w); else a name of its own. `weight_nodes`: how many
    weight nodes of the function name each weight."""
    read = _weights_under(value, prod)
    names = {w.attrs["name"] for w in read}
    if len(read) == 1 and len(users.get(read[0].outputs[0], [])) == 1 and weight_nodes[read[0].attrs["name"]] == 1:
        return read[0].attrs["name"]
    return f"{sorted(names)[0]}.folded"


def _evaluate(value: str, prod: dict[str, Node], weights, cache: dict[str, np.ndarray]) -> np.ndarray:
    if value in cache:
        return cache[value]
    node = prod[value]
    if node.op == "weight":
        out = np.asarray(weights[node.attrs["name"]])
        out = out.astype(np.float32) if out.dtype.kind in "fV" else out
    else:
        xs = [_evaluate(v, prod, weights, cache) for v in node.inputs]
        out = OPS[node.op].ref(xs, node.attrs, RefContext(weights, {}))[0]
    cache[value] = out
    return out


def _rewrite(fn: Function, ctx: PassContext, types: dict[str, TensorType]) -> Function:
    prod, users = producers(fn), consumers(fn)
    roots = _static_roots(fn, users)
    if not roots:
        return fn
    weight_nodes = Counter(n.attrs["name"] for n in fn.nodes if n.op == "weight")
    cache: dict[str, np.ndarray] = {}
    nodes = []
    for node in fn.nodes:
        value = node.outputs[0]
        if value not in roots:
            nodes.append(node)
            continue
        name = _folded_name(value, prod, users, weight_nodes)
        array = np.ascontiguousarray(_evaluate(value, prod, ctx.weights, cache), dtype=np.float32)
        ctx.weights[name] = array
        types[name] = TensorType(tuple(array.shape), "float32")
        nodes.append(Node("weight", (), (value,), {"name": name}))
    fn_types = {**fn.types, **{v: TensorType(fn.types[v].shape, "float32") for v in roots}}
    return dead_code_elimination(Function(fn.name, fn.inputs, tuple(nodes), fn.outputs, fn_types))


@dataclass(frozen=True)
class FoldWeightExpressions(Pass):
    """Kept in float32: the folded value (1 + w of a bf16 w) is what the model computes, in the precision it does."""

    name = "fold_weight_expressions"
    requires = frozenset({"traced"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        types = dict(module.weights)
        functions = {k: _rewrite(f, ctx, types) for k, f in module.functions.items()}
        return module.replace(functions=functions, weights=types)

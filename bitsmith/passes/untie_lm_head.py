"""untie_lm_head: give a tied output projection its own `lm_head.weight` so that it can be quantized."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass

LM_HEAD = "lm_head.weight"


def tied_weights(module: Module) -> set[str]:
    """Weights read both as an embedding table and as the matrix of a linear (a tied lm_head)."""
    roles: dict[str, set[str]] = {}
    for fn in module.functions.values():
        name_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
        for node in fn.nodes:
            if node.op == "embedding" and node.inputs[0] in name_of:
                roles.setdefault(name_of[node.inputs[0]], set()).add("embedding")
            if node.op == "linear" and node.inputs[1] in name_of:
                roles.setdefault(name_of[node.inputs[1]], set()).add("linear")
    return {name for name, r in roles.items() if r == {"embedding", "linear"}}


def _untie(fn: Function, tied: str) -> Function:
    """`fn` with every linear that read `tied` reading a new `lm_head.weight` node instead."""
    name_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    head_value = f"{LM_HEAD}.untied"
    nodes: list[Node] = []
    for node in fn.nodes:
        if node.op == "linear" and name_of.get(node.inputs[1]) == tied:
            if not any(n.outputs == (head_value,) for n in nodes):
                nodes.append(Node("weight", (), (head_value,), {"name": LM_HEAD}))
            node = Node(node.op, (node.inputs[0], head_value, *node.inputs[2:]), node.outputs, dict(node.attrs))
        nodes.append(node)
    types = {**fn.types, head_value: fn.types[next(v for v, n in name_of.items() if n == tied)]}
    return fn.replace(nodes=tuple(nodes), types=types)


@dataclass(frozen=True)
class UntieLmHead(Pass):
    """When the embedding table doubles as the lm_head, the lm_head gets its own copy, `lm_head.weight`.

    The embedding lookup reads a handful of rows per step but the lm_head reads the whole table every
    step (SmolLM2: 49152 x 576, 57 MB in fp16: a third of a decode step's bytes). Untied, precision
    assignment can quantize the lm_head (e.g. `--scheme lm_head=int8`, what llama.cpp's Q4_0 files do
    with Q8_0) while the lookup stays exact. The pipeline runs it only when a --scheme names the lm_head.
    """

    name = "untie_lm_head"
    requires = frozenset({"canonical"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        tied = sorted(tied_weights(module))
        if len(tied) != 1 or LM_HEAD in module.weights:
            return module
        functions = {key: _untie(fn, tied[0]) for key, fn in module.functions.items()}
        ctx.weights.link(LM_HEAD, tied[0])  # the same entry: later passes write new ones, never in place
        return module.replace(functions=functions, weights={**module.weights, LM_HEAD: module.weights[tied[0]]})

"""Rewrite linear -> qlinear over the packed parts (uint32 codes + fp16 scales (+ zeros)) quantize_weights wrote."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.ir import Function, Module, Node, TensorType
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext, QuantizedInfo
from bitsmith.passes.manager import Pass
from bitsmith.passes.quantize_weights import part_names


def qlinear_attrs(qw: QuantizedInfo) -> dict:
    """bits, group_size, in_features, sym; and, only when set (older artifacts lack them), offset (min form),
    super_group (256: K-quant scale codes) and has_perm (act-order input gather)."""
    attrs = {"bits": qw.scheme.bits, "group_size": qw.scheme.group_size, "in_features": qw.in_features,
             "sym": qw.scheme.sym}
    extra = {"offset": qw.scheme.offset, "super_group": qw.scheme.super_group, "has_perm": qw.has_perm}
    return attrs | {k: v for k, v in extra.items() if v}


def qmoe_node(node: Node, parts: dict[str, tuple[str, ...]], source: dict[str, str],
              quantized: dict[str, QuantizedInfo], types: dict[str, TensorType]) -> Node:
    """moe(x, w, idx, gate_up, down) -> qmoe over both stacked tensors' packed parts (one scheme for the two)."""
    gate_up, down = node.inputs[3:5]
    schemes = {quantized[source[v]].scheme if v in parts else None for v in (gate_up, down)}
    if len(schemes) != 1:
        names = [source.get(v, v) for v in (gate_up, down)]
        raise BitsmithError(f"the experts {names[0]} and {names[1]} of one MoE block have different schemes "
                            f"({', '.join(sorted(s.name if s else '16-bit' for s in schemes))})",
                            where="pass pack_weights", fix="give both stacked expert tensors of a block the same "
                            "--scheme (e.g. '*.experts.*=int8')")
    info = quantized[source[gate_up]]
    attrs = {"bits": info.scheme.bits, "group_size": info.scheme.group_size, "sym": info.scheme.sym,
             "hidden": info.in_features, "inter": info.out_features // 2, "experts": types[parts[gate_up][0]].shape[0],
             "act": node.attrs.get("act", "silu")}
    return Node("qmoe", (*node.inputs[:3], *parts[gate_up], *parts[down]), node.outputs, attrs)


def _rewrite(fn: Function, quantized: dict[str, QuantizedInfo], weights: dict[str, TensorType]) -> Function:
    types = dict(fn.types)
    parts: dict[str, tuple[str, ...]] = {}  # old weight value -> its packed part values
    source: dict[str, str] = {}  # old weight value -> weight name
    nodes: list[Node] = []
    for node in fn.nodes:
        if node.op == "weight" and node.attrs["name"] in quantized:
            name = node.attrs["name"]
            qw = quantized[name]
            names = part_names(name, qw.scheme, qw.has_perm)
            values = tuple(f"{node.outputs[0]}.{n.rsplit('.', 1)[1]}" for n in names)
            for n, v in zip(names, values):
                nodes.append(Node("weight", (), (v,), {"name": n}))
                types[v] = weights[n]
            parts[node.outputs[0]], source[node.outputs[0]] = values, name
            types.pop(node.outputs[0], None)
        elif node.op == "moe" and (node.inputs[3] in parts or node.inputs[4] in parts):
            nodes.append(qmoe_node(node, parts, source, quantized, types))
        elif node.op == "linear" and node.inputs[1] in parts:
            attrs = qlinear_attrs(quantized[source[node.inputs[1]]]) | {"has_bias": len(node.inputs) == 3}
            nodes.append(Node("qlinear", (node.inputs[0], *parts[node.inputs[1]], *node.inputs[2:]), node.outputs,
                              attrs))
        else:
            nodes.append(node)
    return fn.replace(nodes=tuple(nodes), types=types)


@dataclass(frozen=True)
class PackWeights(Pass):
    """Reads ctx.quantized (quantize_weights); runs after cast_weights, which casts only the weights the IR
    lists (the packed parts join the IR's weights here)."""

    name = "pack_weights"
    requires = frozenset({"quantized", "cast"})
    provides = frozenset({"packed"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        quantized = ctx.quantized
        if not quantized:
            return module
        weights = {k: t for k, t in module.weights.items() if k not in quantized}
        for name, info in quantized.items():
            ctx.weights.pop(name, None)
            for n in part_names(name, info.scheme, info.has_perm):
                if n in ctx.weights:
                    weights[n] = TensorType(ctx.weights.shape(n), str(ctx.weights.dtype(n)))
        functions = {k: _rewrite(f, quantized, weights) for k, f in module.functions.items()}
        meta = dict(module.meta)
        imported = {name: info.source_type for name, info in quantized.items() if info.source_type}
        if imported:  # which weights kept a pre-quantized source's codes, and its type for each (inspect shows it)
            meta["imported_types"] = dict(sorted(imported.items()))
        return module.replace(functions=functions, weights=weights, meta=meta)

"""Remove layout no-ops: identity reshape/transpose/cast/broadcast, transpose pairs, reshape chains, empty concat
parts; move transposes that keep the last axis past per-row norms so pairs of them meet and cancel."""

from __future__ import annotations

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.errors import BitsmithError
from bitsmith.passes.rewrite import FunctionRewriter, TracedRewrite, map_functions


ROW_OPS = ("rmsnorm", "layernorm")  # ops that work on each last-axis row alone


def _keeps_last(perm: list[int]) -> bool:
    return list(perm)[-1] == len(perm) - 1


def _simplified(node: Node, rw: FunctionRewriter, fn: Function) -> str | None:
    """A value equal to `node`'s output built from earlier values, or None to keep the node."""
    src = node.inputs[0] if node.inputs else None
    out_type = fn.types[node.outputs[0]]
    if node.op in ("reshape", "broadcast_to", "cast") and rw.type_of(src) == out_type:
        return src
    prev = rw.producer(src) if src is not None else None
    if node.op == "reshape" and prev is not None and prev.op == "reshape":
        try:
            return rw.emit("reshape", [prev.inputs[0]], hint=node.outputs[0], shape=node.attrs["shape"])
        except BitsmithError:  # a -1 the shorter chain cannot resolve symbolically: keep both
            return None
    if node.op == "concat":  # a zero-width part (the empty pass-through half of a full rotary) adds nothing
        axis = node.attrs["axis"] % out_type.rank
        parts = [v for v in node.inputs if rw.type_of(v).shape[axis] != 0]
        if len(parts) == 1:
            return parts[0]
        if len(parts) < len(node.inputs):
            return rw.emit("concat", parts, hint=node.outputs[0], axis=node.attrs["axis"])
    if node.op in ROW_OPS and prev is not None and prev.op == "transpose" and _keeps_last(prev.attrs["perm"]):
        # a per-row op commutes with a transpose that keeps the last axis: norm first, so the transposes around it
        # meet and cancel (Gemma 3's q/k norm in the [heads, seq, d] layout)
        normed = rw.emit(node.op, [prev.inputs[0], *node.inputs[1:]], hint=node.outputs[0], **node.attrs)
        return rw.emit("transpose", [normed], hint=node.outputs[0], perm=prev.attrs["perm"])
    if node.op == "transpose":
        perm = list(node.attrs["perm"])
        if perm == sorted(perm):
            return src
        if prev is not None and prev.op == "transpose":
            composed = [prev.attrs["perm"][p] for p in perm]  # out[i] = mid[perm[i]] = x[prev[perm[i]]]
            if composed == sorted(composed):
                return prev.inputs[0]
            return rw.emit("transpose", [prev.inputs[0]], hint=node.outputs[0], perm=composed)
        inner = rw.producer(prev.inputs[0]) if prev is not None and prev.op == "slice" else None
        if inner is not None and inner.op == "transpose":
            # transpose(slice(transpose(x))) with inverse perms is a slice of x (GPT-NeoX's fused qkv split)
            composed = [inner.attrs["perm"][p] for p in perm]
            if composed == sorted(composed):
                axis = perm.index(prev.attrs["axis"] % len(perm))
                return rw.emit("slice", [inner.inputs[0]], hint=node.outputs[0], axis=axis, start=prev.attrs["start"],
                               end=prev.attrs["end"], step=prev.attrs.get("step", 1))
    return None


def _rewrite(fn: Function, module: Module) -> Function:
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        new = _simplified(node, rw, fn) if len(node.outputs) == 1 else None
        if new is None:
            rw.keep(node)
        else:
            rw.replace(node.outputs[0], new)
    return rw.finish()


def simplify_layout(module: Module) -> Module:
    return map_functions(module, _rewrite)


class SimplifyLayout(TracedRewrite):
    name = "simplify_layout"

    def rewrite(self, module: Module) -> Module:
        return simplify_layout(module)

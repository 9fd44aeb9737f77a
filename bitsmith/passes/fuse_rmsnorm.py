"""Fuse the decomposed RMSNorm `w * (x * rsqrt(mean(x^2, -1) + eps))` into one `rmsnorm` node."""

from __future__ import annotations

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.passes.rewrite import FunctionRewriter, TracedRewrite, const_value, map_functions, producers

PASSTHROUGH = ("cast",)  # float casts around the norm (x.to(float32), y.to(input_dtype)) do not change the math


def _strip(value: str, prod: dict[str, Node]) -> str:
    while (node := prod.get(value)) is not None and node.op in PASSTHROUGH and node.attrs.get("dtype") in (
            "float32", "float16", "bfloat16"):
        value = node.inputs[0]
    return value


def _core(node: Node, fn: Function, prod: dict[str, Node]) -> tuple[str, float] | None:
    """(x, eps) when `node` is `x * rsqrt(mean(x^2, last, keepdim) + eps)`, else None."""
    if node.op != "mul":
        return None
    for x, r in (node.inputs, node.inputs[::-1]):
        rs = prod.get(_strip(r, prod))
        if rs is None or rs.op != "rsqrt" or (add := prod.get(rs.inputs[0])) is None or add.op != "add":
            continue
        for m, e in (add.inputs, add.inputs[::-1]):
            mean, eps = prod.get(m), const_value(prod.get(e))
            if mean is None or mean.op != "mean" or eps is None or eps.size != 1 or not mean.attrs.get("keepdim"):
                continue
            rank = fn.types[mean.inputs[0]].rank
            if [a % rank for a in mean.attrs["axes"]] != [rank - 1]:
                continue
            sq = prod.get(mean.inputs[0])
            if sq is None or sq.op != "pow" or float(sq.attrs["exponent"]) != 2.0:
                continue
            if _strip(sq.inputs[0], prod) == _strip(x, prod):
                return _strip(x, prod), float(eps.reshape(-1)[0])
    return None


def _is_norm_weight(value: str, x_type, fn: Function, prod: dict[str, Node]) -> bool:
    node = prod.get(_strip(value, prod))
    return node is not None and node.op == "weight" and fn.types[node.outputs[0]].shape == (x_type.shape[-1],)


def _rewrite(fn: Function, module: Module) -> Function:
    prod = producers(fn)
    cores = {n.outputs[0]: c for n in fn.nodes if (c := _core(n, fn, prod))}
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        rw.keep(node)
        out = node.outputs[0]
        if node.op == "mul":
            for y, w in (node.inputs, node.inputs[::-1]):
                core = cores.get(_strip(y, prod))
                if core and _is_norm_weight(w, fn.types[core[0]], fn, prod):
                    x, eps = core
                    rw.replace(out, rw.emit("rmsnorm", [x, _strip(w, prod)], hint=out, eps=eps))
                    break
            else:
                if out in cores:
                    x, eps = cores[out]
                    rw.replace(out, rw.emit("rmsnorm", [x], hint=out, eps=eps))
    return rw.finish()


def fuse_rmsnorm(module: Module) -> Module:
    return map_functions(module, _rewrite)


class FuseRmsnorm(TracedRewrite):
    name = "fuse_rmsnorm"

    def rewrite(self, module: Module) -> Module:
        return fuse_rmsnorm(module)

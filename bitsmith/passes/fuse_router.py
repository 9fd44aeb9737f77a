"""Fuse a MoE router spelled out in ops (`topk(softmax(logits))`, then `w / sum(w)` when it renormalises) into `router`."""

from __future__ import annotations

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.passes.rewrite import FunctionRewriter, TracedRewrite, consumers, map_functions, producers


def _last_axis(node: Node, rank: int) -> bool:
    return [a % rank for a in node.attrs.get("axes", [node.attrs.get("axis", -1)])] == [rank - 1]


def _renormalisation(fn: Function, users: dict[str, list[Node]], values: str) -> list[Node]:
    """[sum, div] when the top-k values are only ever divided by their own sum over the last axis, else []."""
    readers = users.get(values, [])
    sums = [n for n in readers if n.op == "sum" and n.attrs.get("keepdim") and _last_axis(n, 2)]
    if len(readers) != 2 or len(sums) != 1:
        return []
    div = next((n for n in readers if n.op == "div"), None)
    if div is None or div.inputs != (values, sums[0].outputs[0]) or len(users.get(sums[0].outputs[0], [])) != 1:
        return []
    return [sums[0], div]


def _rewrite(fn: Function, module: Module) -> Function:
    prod, users = producers(fn), consumers(fn)
    rw = FunctionRewriter(fn, module.weights)
    skip: set[int] = set()
    for node in fn.nodes:
        if id(node) in skip:
            continue
        logits = node.inputs[0] if node.op == "topk" else None
        if logits is None or fn.types[logits].rank != 2:
            rw.keep(node)
            continue
        scoring, src = "logits", prod.get(logits)
        if src is not None and src.op == "softmax" and _last_axis(src, 2):
            scoring, logits = "softmax", src.inputs[0]
        norm = _renormalisation(fn, users, node.outputs[0])
        skip.update(id(n) for n in norm)
        weights, experts = rw.emit_multi("router", [logits], hint=node.outputs[0], top_k=node.attrs["k"],
                                         scoring=scoring, normalize=bool(norm))
        rw.replace((norm[-1] if norm else node).outputs[0], weights)
        rw.replace(node.outputs[1], experts)
    return rw.finish()


def fuse_router(module: Module) -> Module:
    return map_functions(module, _rewrite)


class FuseRouter(TracedRewrite):
    name = "fuse_router"

    def rewrite(self, module: Module) -> Module:
        return fuse_router(module)

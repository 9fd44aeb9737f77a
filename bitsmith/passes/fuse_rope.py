"""Fuse decomposed rotate-half RoPE (`x*cos + rotate_half(x)*sin` of positions*inv_freq) into `rope` nodes."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.compiler.ops.llm import rope_inv_freq
from bitsmith.passes.rewrite import (FunctionRewriter, TracedRewrite, const_value, is_scalar_const, map_functions,
                                       producers)

SEQ = "seq"
BIG = 1 << 62  # an open slice end


def _peel(value: str, prod: dict[str, Node]) -> str:
    """Skip what only re-lays out or re-types cos/sin/positions: reshape, broadcast, cast, `* 1.0`."""
    while (node := prod.get(value)) is not None:
        if node.op in ("reshape", "broadcast_to", "cast"):
            value = node.inputs[0]
        elif node.op == "mul" and is_scalar_const(prod.get(node.inputs[1]), 1.0):
            value = node.inputs[0]
        elif node.op == "mul" and is_scalar_const(prod.get(node.inputs[0]), 1.0):
            value = node.inputs[1]
        else:
            break
    return value


def _op(value: str, prod: dict[str, Node], op: str) -> Node | None:
    node = prod.get(value)
    return node if node is not None and node.op == op else None


def _last_slice(value: str, fn: Function, prod: dict[str, Node]) -> tuple[str, int, int] | None:
    """(source, start, end) when `value` slices the last axis with step 1."""
    node = _op(value, prod, "slice")
    if node is None or node.attrs.get("step", 1) != 1:
        return None
    rank = fn.types[node.inputs[0]].rank
    if node.attrs["axis"] % rank != rank - 1:
        return None
    size = fn.types[node.inputs[0]].shape[-1]
    start, end, _ = slice(node.attrs["start"], node.attrs["end"]).indices(size)
    return node.inputs[0], start, end


def _angles(cos_in: str, sin_in: str, fn: Function, prod: dict[str, Node]) -> np.ndarray | None:
    """inv_freq [rot/2] when cos/sin read cos/sin(concat([p*inv, p*inv])) with p the positions input."""
    c, s = _op(_peel(cos_in, prod), prod, "cos"), _op(_peel(sin_in, prod), prod, "sin")
    if c is None or s is None or _peel(c.inputs[0], prod) != _peel(s.inputs[0], prod):
        return None
    cat = _op(_peel(c.inputs[0], prod), prod, "concat")
    if cat is None or len(cat.inputs) != 2 or cat.inputs[0] != cat.inputs[1]:
        return None
    freqs = _op(cat.inputs[0], prod, "mul")
    if freqs is None:
        return None
    for p, inv in (freqs.inputs, freqs.inputs[::-1]):
        value = const_value(prod.get(inv))
        if _peel(p, prod) == "positions" and value is not None and value.ndim == 1:
            return value
    return None


def _theta(inv: np.ndarray, candidates: list[dict[str, Any]]) -> tuple[float, dict | None] | None:
    """RoPE (theta, scaling) reproducing `inv` as transformers computes it; None if no candidate does."""
    rot = 2 * inv.size
    options = [(float(c["theta"]), c.get("scaling")) for c in candidates]
    if inv.size >= 2 and inv[-1] > 0:
        # inv[i] = theta^(-2i/rot); the last entry pins theta best. Prefer the nearest integer theta.
        theta = float(inv[-1]) ** (-rot / (rot - 2.0))
        options += [(float(round(theta)), None), (theta, None)]
    for theta, scaling in options:
        if np.allclose(rope_inv_freq(rot, theta, scaling), inv, rtol=1e-5, atol=0):
            return theta, scaling
    return None


def _broadcasts_per_token(cos_shape: tuple, x_shape: tuple) -> bool:
    """cos/sin vary only along x's seq axis and last axis (right-aligned broadcasting)."""
    if len(cos_shape) > len(x_shape):
        return False
    aligned = (1,) * (len(x_shape) - len(cos_shape)) + tuple(cos_shape)
    last = len(x_shape) - 1
    return all(c == d if (d == SEQ or i == last) else c == 1 for i, (c, d) in enumerate(zip(aligned, x_shape)))


def _core(node: Node, fn: Function, prod: dict[str, Node], candidates: list) -> dict | None:
    """`x*cos + rotate_half(x)*sin` over the last axis of x -> {x, rot, theta, scaling}."""
    if node.op != "add":
        return None
    muls = [_op(v, prod, "mul") for v in node.inputs]
    if None in muls:
        return None
    for m_cos, m_sin in (muls, muls[::-1]):
        for x, cos_in in (m_cos.inputs, m_cos.inputs[::-1]):
            for rot_in, sin_in in (m_sin.inputs, m_sin.inputs[::-1]):
                cat = _op(rot_in, prod, "concat")
                if cat is None or len(cat.inputs) != 2 or (neg := _op(cat.inputs[0], prod, "neg")) is None:
                    continue
                hi, lo = _last_slice(neg.inputs[0], fn, prod), _last_slice(cat.inputs[1], fn, prod)
                rot = fn.types[x].shape[-1]
                if not isinstance(rot, int) or hi != (x, rot // 2, rot) or lo != (x, 0, rot // 2):
                    continue
                if not _broadcasts_per_token(fn.types[cos_in].shape, fn.types[x].shape):
                    continue
                inv = _angles(cos_in, sin_in, fn, prod)
                if inv is None or 2 * inv.size != rot or (ts := _theta(inv, candidates)) is None:
                    continue
                return {"x": x, "rot": rot, "theta": ts[0], "scaling": ts[1]}
    return None


def _emit(rw: FunctionRewriter, fn: Function, x: str, rot: int, theta: float, scaling: dict | None,
          hint: str) -> str | None:
    """rope over x laid out [seq, heads, d] or [heads, seq, d] (HF's transposed layout)."""
    shape = fn.types[x].shape
    if len(shape) != 3 or shape.count(SEQ) != 1 or shape[2] == SEQ:
        return None
    attrs = dict(theta=theta, style="half", rotary_dim=rot, scaling=scaling)
    if shape[0] == SEQ:
        return rw.emit("rope", [x, "positions"], hint=hint, **attrs)
    t = rw.emit("transpose", [x], hint=hint + ".t", perm=[1, 0, 2])
    r = rw.emit("rope", [t, "positions"], hint=hint, **attrs)
    return rw.emit("transpose", [r], hint=hint + ".tt", perm=[1, 0, 2])


def _rewrite(fn: Function, module: Module) -> Function:
    if "positions" not in fn.types:
        return fn
    prod = producers(fn)
    candidates = module.meta.get("rope_candidates", [])
    cores = {n.outputs[0]: c for n in fn.nodes if (c := _core(n, fn, prod, candidates))}
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        rw.keep(node)
        out = node.outputs[0]
        core = cores.get(out)
        if node.op == "concat" and len(node.inputs) == 2 and node.inputs[0] in cores:
            # partial rotary: concat([rope(x[..., :r]), x[..., r:]]) is rope(x, rotary_dim=r)
            core = cores[node.inputs[0]]
            head, tail = _last_slice(core["x"], fn, prod), _last_slice(node.inputs[1], fn, prod)
            if head and tail and head[0] == tail[0] and head[1:] == (0, core["rot"]) and \
                    tail[1:] == (core["rot"], fn.types[head[0]].shape[-1]):
                core = dict(core, x=head[0])
            else:
                core = None
        if core is None:
            continue
        new = _emit(rw, fn, core["x"], core["rot"], core["theta"], core["scaling"], out)
        if new is not None and rw.type_of(new) == fn.types[out]:
            rw.replace(out, new)
    return rw.finish()


def fuse_rope(module: Module) -> Module:
    """Needs the symbolic `seq` dim (run on prefill, before decode is derived) to tell the layout."""
    return map_functions(module, _rewrite)


class FuseRope(TracedRewrite):
    name = "fuse_rope"

    def rewrite(self, module: Module) -> Module:
        return fuse_rope(module)

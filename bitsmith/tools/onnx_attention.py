"""ONNX building blocks of the decoder export: a small graph builder, RoPE from position_ids, and GQA attention
over past/present KV tensors (onnxruntime-genai's layout)."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bitsmith.compiler.ops.llm import rope_inv_freq

MASKED = np.float32(-1e30)  # finite: a query row with every key masked (padding) stays NaN-free; exp() gives 0 as -inf


class GraphBuilder:
    """Nodes and initializers with generated unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        self.cache: dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs: list[str], out: str | None = None, domain: str | None = None, **attrs: Any) -> str:
        out = out or self.fresh(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"n_{op}"), domain=domain, **attrs))
        return out

    def const(self, value: np.ndarray | np.generic, name: str | None) -> str:
        """An initializer; unnamed small constants are shared by value."""
        array = np.asarray(value)
        key = None
        if name is None:
            key = f"{array.dtype}:{array.shape}:{array.tobytes().hex()}" if array.size <= 16 else None
            if key in self.cache:
                return self.cache[key]
            name = self.fresh("c")
        self.initializers.append(numpy_helper.from_array(array, name))
        if key:
            self.cache[key] = name
        return name


def rope(g: GraphBuilder, x: str, positions: str, attrs: dict[str, Any]) -> str:
    """x [B, S, heads, d] rotated by position_ids [B, S] exactly as compiler/ops/llm.py's reference (float32 angles)."""
    rot = attrs.get("rotary_dim")
    inv = rope_inv_freq(rot, attrs["theta"], attrs.get("scaling"))
    key = f"rope:{rot}:{attrs['theta']}:{attrs.get('scaling')}"
    if key not in g.cache:
        pos = g.node("Unsqueeze", [g.node("Cast", [positions], to=TensorProto.FLOAT), g.const(np.array([-1]), None)])
        freqs = g.node("Mul", [pos, g.const(inv, g.fresh("inv_freq"))])  # [B, S, rot/2]
        axis = g.const(np.array([2]), None)
        g.cache[key] = (g.node("Unsqueeze", [g.node("Cos", [freqs]), axis]),  # [B, S, 1, rot/2]
                        g.node("Unsqueeze", [g.node("Sin", [freqs]), axis]))
    cos, sin = g.cache[key]

    def cut(t: str, start: int, end: int, step: int = 1) -> str:
        return g.node("Slice", [t, g.const(np.array([start]), None), g.const(np.array([end]), None),
                                g.const(np.array([-1]), None), g.const(np.array([step]), None)])

    head_dim = attrs.get("head_dim")
    xr = cut(x, 0, rot) if head_dim is None or rot < head_dim else x
    if attrs.get("style", "half") == "half":  # pairs (i, i + rot/2): HF rotate_half
        a, b = cut(xr, 0, rot // 2), cut(xr, rot // 2, rot)
    else:  # pairs (2i, 2i+1): llama2.c / GGUF
        a, b = cut(xr, 0, rot, 2), cut(xr, 1, rot, 2)
    first = g.node("Sub", [g.node("Mul", [a, cos]), g.node("Mul", [b, sin])])
    second = g.node("Add", [g.node("Mul", [b, cos]), g.node("Mul", [a, sin])])
    if attrs.get("style", "half") == "half":
        out = g.node("Concat", [first, second], axis=-1)
    else:  # interleave back: [.., rot/2, 2] -> [.., rot]
        last = g.const(np.array([-1]), None)
        pair = g.node("Concat", [g.node("Unsqueeze", [first, last]), g.node("Unsqueeze", [second, last])], axis=-1)
        out = g.node("Reshape", [pair, g.const(np.array([0, 0, 0, rot]), None)])
    # the rest of a partial rotary dim passes through (a 0-length slice when rot == head_dim)
    return g.node("Concat", [out, cut(x, rot, 1 << 30)], axis=-1)


def causal_bias(g: GraphBuilder, window: int) -> str:
    """Additive mask bias [B, 1, S, T]: query i (slot past + i) sees key slot j when j <= past + i (and, with a
    sliding window, j > past + i - window) and attention_mask[b, j] == 1. Slots are positions without padding."""
    zero, one = g.const(np.array(0, dtype=np.int64), None), g.const(np.array(1, dtype=np.int64), None)
    total = g.node("Gather", [g.node("Shape", ["attention_mask"]), one], axis=0)
    seq = g.node("Gather", [g.node("Shape", ["input_ids"]), one], axis=0)
    past = g.node("Sub", [total, seq])
    q_slot = g.node("Unsqueeze", [g.node("Range", [past, total, one]), g.const(np.array([-1]), None)])  # [S, 1]
    k_slot = g.node("Range", [zero, total, one])  # [T]
    visible = g.node("LessOrEqual", [k_slot, q_slot])  # [S, T]
    if window:
        low = g.node("Sub", [q_slot, g.const(np.array(window, dtype=np.int64), None)])
        visible = g.node("And", [visible, g.node("Greater", [k_slot, low])])
    valid = g.node("Unsqueeze", [g.node("Cast", ["attention_mask"], to=TensorProto.BOOL),
                                 g.const(np.array([1, 2]), None)])  # [B, 1, 1, T]
    visible = g.node("And", [visible, valid])  # [B, 1, S, T]
    return g.node("Where", [visible, g.const(np.float32(0), None), g.const(MASKED, None)])


def _kv_store(g: GraphBuilder, t: str, kv_dtype: str, io_dtype: str) -> str:
    """t [B, kvh, S, d] float32 as the artifact's cache stores it, in the graph's KV dtype."""
    if io_dtype == "float16":
        return g.node("Cast", [t], to=TensorProto.FLOAT16)
    if kv_dtype == "int8":  # per (token, head): s = max|x| / 127 (1 when 0), codes round-half-even, clipped
        amax = g.node("ReduceMax", [g.node("Abs", [t]), g.const(np.array([-1]), None)], keepdims=1)
        scale = g.node("Div", [amax, g.const(np.float32(127), None)])
        scale = g.node("Where", [g.node("Greater", [scale, g.const(np.float32(0), None)]), scale,
                                 g.const(np.float32(1), None)])
        codes = g.node("Clip", [g.node("Round", [g.node("Div", [t, scale])]), g.const(np.float32(-127), None),
                                g.const(np.float32(127), None)])
        return g.node("Mul", [codes, scale])
    if kv_dtype == "int4":  # per (token, head): step = (max - min) / 15 (1 when 0), codes of (x - min) in [0, 15]
        axis = g.const(np.array([-1]), None)
        low = g.node("ReduceMin", [t, axis], keepdims=1)
        step = g.node("Div", [g.node("Sub", [g.node("ReduceMax", [t, axis], keepdims=1), low]),
                              g.const(np.float32(15), None)])
        step = g.node("Where", [g.node("Greater", [step, g.const(np.float32(0), None)]), step,
                                g.const(np.float32(1), None)])
        codes = g.node("Clip", [g.node("Round", [g.node("Div", [g.node("Sub", [t, low]), step])]),
                                g.const(np.float32(0), None), g.const(np.float32(15), None)])
        return g.node("Add", [low, g.node("Mul", [codes, step])])
    return t


def attention(g: GraphBuilder, q: str, k: str, v: str, layer: int, bias: str, attrs: dict[str, Any], kvh: int,
              d: int, kv_dtype: str, io_dtype: str) -> str:
    """q [B, S, H, d], k/v [B, S, kvh, d] -> [B, S, H, d]; appends k/v to past_key_values.{layer}.* as present.*.

    GQA without copies: q heads h = kv * rep + r regrouped as [B, kvh, rep*S, d] (row r*S + i), so one batched
    MatMul per kv head scores all its query heads; the [B, 1, S, T] mask is tiled rep = H / kvh times along the
    rows (H read from q's shape at run time: traced families' configs need not name it)."""
    perm = [0, 2, 1, 3]
    present = []
    for kind, t in (("key", k), ("value", v)):
        stored = _kv_store(g, g.node("Transpose", [t], perm=perm), kv_dtype, io_dtype)
        cat = g.node("Concat", [f"past_key_values.{layer}.{kind}", stored], out=f"present.{layer}.{kind}", axis=2)
        present.append(g.node("Cast", [cat], to=TensorProto.FLOAT) if io_dtype == "float16" else cat)
    keys, values = present
    qt = g.node("Transpose", [q], perm=perm)  # [B, H, S, d]
    qg = g.node("Reshape", [qt, g.const(np.array([0, kvh, -1, d]), None)])
    scores = g.node("MatMul", [qg, g.node("Transpose", [keys], perm=[0, 1, 3, 2])])  # [B, kvh, rep*S, T]
    scores = g.node("Mul", [scores, g.const(np.float32(attrs["scale"]), None)])
    if attrs.get("softcap"):  # Gemma 2: softcap * tanh(scores / softcap)
        cap = g.const(np.float32(attrs["softcap"]), None)
        scores = g.node("Mul", [g.node("Tanh", [g.node("Div", [scores, cap])]), cap])
    shape = g.node("Shape", [qt])
    rep = g.node("Div", [g.node("Gather", [shape, g.const(np.array([1]), None)], axis=0),
                         g.const(np.array([kvh]), None)])
    one = g.const(np.array([1]), None)
    tiled = g.node("Tile", [bias, g.node("Concat", [one, one, rep, one], axis=0)])
    probs = g.node("Softmax", [g.node("Add", [scores, tiled])], axis=-1)
    out = g.node("MatMul", [probs, values])  # [B, kvh, rep*S, d]
    out = g.node("Reshape", [out, shape])  # [B, H, S, d]
    return g.node("Transpose", [out], perm=perm)  # [B, S, H, d]

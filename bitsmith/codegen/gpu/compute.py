"""Target-independent TE definitions of the elementwise, norm, rope and embedding kernels on GPUs (the CPU
kernels' arguments); each takes its kernel spec (elementwise.py, norm_rope.py, embedding.py), whose prim_func
schedules it for a GPU (gpu/schedule.py).

Formulas follow the CPU kernels (and the numpy references of bitsmith.compiler.ops*) operation by
operation, except that exp/erf/tanh are the math library's (CUDA's expf, erff, tanhf), not the CPU
kernels' vectorizable polynomials.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import te, tirx

from bitsmith.codegen.common import f32, fconst, rms_stages
from bitsmith.codegen.dequant import table_row, unpack_code, weight_placeholder
from bitsmith.runtime.packed_layout import LANES, lane_unit


def activation(op: str, x: Any) -> Any:
    """op(x) in float32: silu, gelu (erf), gelu_tanh or relu, in the reference's formula order."""
    one, half = fconst(1.0), fconst(0.5)
    if op == "silu":  # x / (1 + exp(-x)): exp overflows to inf for x < -88 and the quotient is -0, as numpy
        return x / (one + tirx.exp(-x))
    if op == "gelu":
        return half * x * (one + tirx.erf(x / fconst(math.sqrt(2.0))))
    if op == "gelu_tanh":
        inner = fconst(math.sqrt(2.0 / math.pi)) * (x + fconst(0.044715) * (x * x * x))
        return half * x * (one + tirx.tanh(inner))
    if op == "relu":
        return tirx.max(x, fconst(0.0))
    if op == "tanh":
        return tirx.tanh(x)
    raise ValueError(op)


def binary_tensors(spec: Any) -> list[Any]:
    """BinarySpec: a, b, y."""
    n = spec.n
    a, b = te.placeholder((n,), "float32", name="a"), te.placeholder((n,), "float32", name="b")
    return [a, b, te.compute((n,), (lambda i: a[i] + b[i]) if spec.op == "add" else (lambda i: a[i] * b[i]),
                             name="y")]


def bias_add_tensors(spec: Any) -> list[Any]:
    """BiasAddSpec: x, b, y."""
    x = te.placeholder((spec.rows, spec.n), "float32", name="x")
    b = weight_placeholder((spec.n,), spec.bias_dtype, "b")
    return [x, b, te.compute((spec.rows, spec.n), lambda r, i: x[r, i] + f32(b[i]), name="y")]


def unary_tensors(spec: Any) -> list[Any]:
    """UnarySpec: x, y."""
    x = te.placeholder((spec.n,), "float32", name="x")
    return [x, te.compute((spec.n,), lambda i: activation(spec.op, x[i]), name="y")]


def gated_tensors(n: int, op: str) -> list[Any]:
    """SiluMulSpec / GeluMulSpec: gate, up, y = op(gate) * up."""
    gate, up = te.placeholder((n,), "float32", name="gate"), te.placeholder((n,), "float32", name="up")
    return [gate, up, te.compute((n,), lambda i: activation(op, gate[i]) * up[i], name="y")]


def rms_norm_tensors(spec: Any) -> list[Any]:
    """RmsNormSpec: x, w, y."""
    x = te.placeholder((spec.rows, spec.dim), "float32", name="x")
    w = weight_placeholder((spec.dim,), spec.weight_dtype, "w")
    return [x, w, rms_stages(x, w, spec.rows, spec.dim, spec.eps)]


def add_rms_norm_tensors(spec: Any) -> list[Any]:
    """AddRmsNormSpec: x, residual, w, sum, y."""
    shape = (spec.rows, spec.dim)
    x = te.placeholder(shape, "float32", name="x")
    res = te.placeholder(shape, "float32", name="residual")
    w = weight_placeholder((spec.dim,), spec.weight_dtype, "w")
    # the norm reads its own copy of the sum (inlined by the GPU schedule) rather than the output
    # `sum`: threads of a GPU block may not read back what others wrote to global memory
    out_sum = te.compute(shape, lambda r, d: x[r, d] + res[r, d], name="sum")
    total = te.compute(shape, lambda r, d: x[r, d] + res[r, d], name="total")
    return [x, res, w, out_sum, rms_stages(total, w, spec.rows, spec.dim, spec.eps)]


def layer_norm_tensors(spec: Any) -> list[Any]:
    """LayerNormSpec: x, w, [b], y."""
    shape = (spec.rows, spec.dim)
    x = te.placeholder(shape, "float32", name="x")
    w = weight_placeholder((spec.dim,), spec.weight_dtype, "w")
    b = weight_placeholder((spec.dim,), spec.weight_dtype, "b") if spec.has_bias else None
    k1, k2 = te.reduce_axis((0, spec.dim), "k1"), te.reduce_axis((0, spec.dim), "k2")
    xs = te.compute((spec.rows,), lambda r: te.sum(x[r, k1], axis=k1), name="xsum")
    mu = te.compute((spec.rows,), lambda r: xs[r] / fconst(spec.dim), name="mu")
    vs = te.compute((spec.rows,), lambda r: te.sum((x[r, k2] - mu[r]) * (x[r, k2] - mu[r]), axis=k2), name="vsum")
    den = te.compute((spec.rows,), lambda r: tirx.sqrt(vs[r] / fconst(spec.dim) + fconst(spec.eps)), name="den")

    def body(r: Any, d: Any) -> Any:
        v = (x[r, d] - mu[r]) / den[r] * f32(w[d])
        return v if b is None else v + f32(b[d])

    return [x, w] + ([] if b is None else [b]) + [te.compute(shape, body, name="y")]


def rope_tensors(spec: Any) -> list[Any]:
    """x [rows, heads, head_dim], positions int64 [rows], inv_freq f32 [rotary_dim / 2], y: pairs rotated by
    angle float32(pos) * inv_freq[i] ("half": (i, i + rot/2), "interleaved": (2i, 2i + 1)), the rest copied."""
    rows, heads, hd, rot = spec.rows, spec.heads, spec.head_dim, spec.rotary_dim
    half = rot // 2
    x = te.placeholder((rows, heads, hd), "float32", name="x")
    pos = te.placeholder((rows,), "int64", name="positions")
    inv = te.placeholder((half,), "float32", name="inv_freq")

    def clamp(e: Any, hi: int) -> Any:  # indices stay in bounds on both sides of every Select
        return tirx.max(tirx.min(e, hi), 0)

    def body(r: Any, h: Any, d: Any) -> Any:
        if spec.style == "interleaved":
            first = tirx.floormod(d, 2) == 0
            i = clamp(tirx.floordiv(d, 2), half - 1)
            partner = clamp(tirx.Select(first, d + 1, d - 1), hd - 1)
        else:
            first = d < half
            i = clamp(tirx.Select(first, d, d - half), half - 1)
            partner = clamp(tirx.Select(first, d + half, d - half), hd - 1)
        angle = tirx.Cast("float32", pos[r]) * inv[i]
        c, s, xv, other = tirx.cos(angle), tirx.sin(angle), x[r, h, d], x[r, h, partner]
        rotated = tirx.Select(first, xv * c - other * s, xv * c + other * s)
        return rotated if rot == hd else tirx.Select(d < rot, rotated, xv)

    return [x, pos, inv, te.compute((rows, heads, hd), body, name="y")]


def embedding_tensors(spec: Any) -> list[Any]:
    """EmbeddingSpec: table, ids, y (ids clamped)."""
    ids = te.placeholder((spec.rows,), "int64", name="ids")
    table = weight_placeholder((spec.vocab, spec.dim), spec.dtype, "table")
    y = te.compute((spec.rows, spec.dim), lambda r, d: f32(table[table_row(ids, r, spec.vocab), d]), name="y")
    return [table, ids, y]


def qembedding_tensors(spec: Any) -> list[Any]:
    """QEmbeddingSpec: qweight, scales, [zeros], ids, y (ids clamped)."""
    ids = te.placeholder((spec.rows,), "int64", name="ids")
    w = te.placeholder(spec.weight_shape(), "uint32", name="qweight")
    s = te.placeholder((spec.vocab, spec.n_groups), "float16", name="scales")
    z = None if spec.sym else te.placeholder((spec.vocab, spec.n_groups), "float16", name="zeros")
    y = te.compute((spec.rows, spec.dim), lambda r, k: _dequant(spec, w, s, z, table_row(ids, r, spec.vocab), k),
                   name="y")
    return [w, s] + ([] if z is None else [z]) + [ids, y]


def _dequant(spec: Any, w: Any, s: Any, z: Any, o: Any, k: Any) -> Any:
    """(q - z) * s of element k of packed row o: in a full block k = kb*16*S + j*16 + l, in the tail block
    (L lanes) k = base + j*L + l (see bitsmith.runtime.packed_layout)."""
    units, slots = lane_unit(spec.bits)
    full, rest = divmod(spec.dim, LANES * slots)
    base, tail_lanes = full * LANES * slots, -(-rest // slots)
    kf, kt = tirx.min(k, max(base - 1, 0)), tirx.max(k - base, 0)  # each side stays in bounds
    main = unpack_code(w, o, kf // (LANES * slots) * LANES * units, kf // LANES % slots, kf % LANES, LANES,
                       spec.bits)
    code = main
    if rest:
        tail = unpack_code(w, o, full * LANES * units, kt // tail_lanes, kt % tail_lanes, tail_lanes, spec.bits)
        code = tail if not full else tirx.Select(k < base, main, tail)
    g = k // spec.group
    zero = fconst(float(1 << (spec.bits - 1))) if z is None else f32(z[o, g])
    return (code - zero) * f32(s[o, g])

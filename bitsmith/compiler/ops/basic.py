"""Generic ops: elementwise math, casts, weights and constants, shape plumbing, reductions, matmul."""

from __future__ import annotations

import math
from math import erf
from typing import Callable

import numpy as np

from bitsmith.compiler.ir import Dim, TensorType
from bitsmith.compiler.ops.registry import (COMPUTE_DTYPE, FLOAT, RefFn, as_float, axis_index, bind, broadcast_dims,
                                            check, register, reshape_dims)


def _same(in_types, attrs, weights):
    return [TensorType(in_types[0].shape, in_types[0].dtype)]


def _binary(in_types, attrs, weights):
    a, b = in_types
    dtype = a.dtype if a.dtype == b.dtype else COMPUTE_DTYPE
    return [TensorType(broadcast_dims(a.shape, b.shape), dtype)]


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> RefFn:
    return lambda xs, attrs, ctx: [fn(as_float(xs[0]))]


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x**3)))
    return (0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / math.sqrt(2.0)))).astype(np.float32)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


for _name, _fn in {
    "silu": _silu,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "neg": np.negative,
    "cos": np.cos,
    "sin": np.sin,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
}.items():
    register(_name, (1, 1), _same, _unary(_fn))

register("gelu", (1, 1), _same, lambda xs, a, c: [_gelu(as_float(xs[0]), a.get("approximate", "none"))])
register("pow", (1, 1), _same, lambda xs, a, c: [np.power(as_float(xs[0]), np.float32(a["exponent"]))])


def _binary_ref(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> RefFn:
    def ref(xs, attrs, ctx):
        a, b = xs
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            a, b = as_float(a), as_float(b)
        return [fn(a, b)]

    return ref


for _name, _fn in {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}.items():
    register(_name, (2, 2), _binary, _binary_ref(_fn))


def _cast_infer(in_types, attrs, weights):
    return [TensorType(in_types[0].shape, attrs["dtype"])]


def _cast_ref(xs, attrs, ctx):
    # Float values stay float32 in the reference; only integer casts change the array.
    return [xs[0].astype(np.float32 if attrs["dtype"] in FLOAT else attrs["dtype"])]


register("cast", (1, 1), _cast_infer, _cast_ref)


# ---------------------------------------------------------------- sources


def _weight_infer(in_types, attrs, weights):
    name = attrs["name"]
    check(name in weights, f"no weight named {name!r}")
    return [weights[name]]


def _weight_ref(xs, attrs, ctx):
    return [ctx.weights[attrs["name"]]]


register("weight", (0, 0), _weight_infer, _weight_ref)


def _const_infer(in_types, attrs, weights):
    return [TensorType(np.asarray(attrs["value"]).shape, attrs["dtype"])]


def _const_ref(xs, attrs, ctx):
    dtype = np.float32 if attrs["dtype"] in FLOAT else attrs["dtype"]
    return [np.asarray(attrs["value"], dtype=dtype)]


register("const", (0, 0), _const_infer, _const_ref)


# ---------------------------------------------------------------- shape plumbing


def _reshape_infer(in_types, attrs, weights):
    return [TensorType(reshape_dims(in_types[0].shape, tuple(attrs["shape"])), in_types[0].dtype)]


register("reshape", (1, 1), _reshape_infer,
         lambda xs, a, c: [xs[0].reshape(bind(a["shape"], c.dims))])


def _transpose_infer(in_types, attrs, weights):
    shape, perm = in_types[0].shape, attrs["perm"]
    check(sorted(perm) == list(range(len(shape))), f"perm {perm} does not fit rank {len(shape)}")
    return [TensorType(tuple(shape[p] for p in perm), in_types[0].dtype)]


register("transpose", (1, 1), _transpose_infer, lambda xs, a, c: [np.transpose(xs[0], a["perm"])])


def _concat_infer(in_types, attrs, weights):
    rank = in_types[0].rank
    axis = axis_index(attrs["axis"], rank)
    total: Dim = 0
    for t in in_types:
        check(t.rank == rank, "concat inputs differ in rank")
        for i, (d0, d) in enumerate(zip(in_types[0].shape, t.shape)):
            check(i == axis or d0 == d, f"concat inputs differ on axis {i}: {d0} vs {d}")
        check(isinstance(t.shape[axis], int) and isinstance(total, int), "concat along a symbolic axis")
        total += t.shape[axis]
    shape = list(in_types[0].shape)
    shape[axis] = total
    return [TensorType(tuple(shape), in_types[0].dtype)]


register("concat", (1, 64), _concat_infer, lambda xs, a, c: [np.concatenate(xs, axis=a["axis"])])


def _slice_infer(in_types, attrs, weights):
    shape = list(in_types[0].shape)
    axis = axis_index(attrs["axis"], len(shape))
    size = shape[axis]
    check(isinstance(size, int), "slice along a symbolic axis")
    shape[axis] = len(range(*slice(attrs["start"], attrs["end"], attrs.get("step", 1)).indices(size)))
    return [TensorType(tuple(shape), in_types[0].dtype)]


def _slice_ref(xs, attrs, ctx):
    index = [slice(None)] * xs[0].ndim
    index[attrs["axis"]] = slice(attrs["start"], attrs["end"], attrs.get("step", 1))
    return [xs[0][tuple(index)]]


register("slice", (1, 1), _slice_infer, _slice_ref)


def _broadcast_infer(in_types, attrs, weights):
    target = tuple(attrs["shape"])
    check(broadcast_dims(in_types[0].shape, target) == target, f"cannot broadcast {in_types[0].shape} to {target}")
    return [TensorType(target, in_types[0].dtype)]


register("broadcast_to", (1, 1), _broadcast_infer,
         lambda xs, a, c: [np.broadcast_to(xs[0], bind(a["shape"], c.dims))])


# ---------------------------------------------------------------- reductions and matmul


def _reduce_infer(in_types, attrs, weights):
    shape = in_types[0].shape
    axes = {axis_index(a, len(shape)) for a in attrs["axes"]}
    keep = attrs.get("keepdim", False)
    out = tuple(1 if i in axes else d for i, d in enumerate(shape) if keep or i not in axes)
    return [TensorType(out, in_types[0].dtype)]


register("mean", (1, 1), _reduce_infer,
         lambda xs, a, c: [np.mean(as_float(xs[0]), axis=tuple(a["axes"]), keepdims=a.get("keepdim", False))])


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


register("softmax", (1, 1), _same, lambda xs, a, c: [_softmax(as_float(xs[0]), a.get("axis", -1))])


def _matmul_infer(in_types, attrs, weights):
    a, b = in_types
    check(a.rank >= 2 and b.rank >= 2, "matmul needs rank >= 2")
    check(a.shape[-1] == b.shape[-2], f"matmul contraction mismatch {a.shape} @ {b.shape}")
    batch = broadcast_dims(a.shape[:-2], b.shape[:-2])
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), COMPUTE_DTYPE)]


register("matmul", (2, 2), _matmul_infer, lambda xs, a, c: [np.matmul(as_float(xs[0]), as_float(xs[1]))])


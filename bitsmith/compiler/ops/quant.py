"""Quantized IR ops: `qlinear`, a linear whose weight is packed b-bit codes with fp16 group scales/zeros."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.ops.registry import COMPUTE_DTYPE, as_float, check, register
from bitsmith.runtime.packed_layout import packed_shape, unpack

# qlinear(x[..., in], qweight uint32[out, words], scales f16[out, groups], (zeros f16[out, groups]), (bias[out]))
#   attrs: bits, group_size (-1: per channel), in_features, sym (no zeros input), has_bias
#   w[o, k] = (q[o, k] - z[o, g(k)]) * s[o, g(k)],  g(k) = k // group,  z = 2^(bits-1) when sym
#   layout of qweight: bitsmith.passes.quant.packing


def _groups(attrs: dict) -> int:
    size = attrs["in_features"] if attrs["group_size"] == -1 else attrs["group_size"]
    return -(-attrs["in_features"] // size)


def _qlinear_infer(in_types, attrs, weights):
    x, qweight, scales = in_types[:3]
    n_in = attrs["in_features"]
    expected_inputs = 3 + (not attrs["sym"]) + bool(attrs.get("has_bias"))
    check(len(in_types) == expected_inputs, f"qlinear expects {expected_inputs} inputs, got {len(in_types)}")
    check(x.shape[-1] == n_in, f"qlinear input has {x.shape[-1]} features, weight expects {n_in}")
    out = qweight.shape[0]
    check(qweight.dtype == "uint32" and qweight.shape == packed_shape(out, n_in, attrs["bits"]),
           f"qweight {qweight} does not hold {out}x{n_in} {attrs['bits']}-bit codes")
    check(scales.shape == (out, _groups(attrs)), f"scales {scales.shape} != ({out}, {_groups(attrs)})")
    for extra in in_types[3:3 + (not attrs["sym"])]:
        check(extra.shape == scales.shape, f"zeros {extra.shape} != scales {scales.shape}")
    if attrs.get("has_bias"):
        check(in_types[-1].shape == (out,), f"bias {in_types[-1].shape} != ({out},)")
    return [TensorType(x.shape[:-1] + (out,), COMPUTE_DTYPE)]


def dequantize_packed(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, attrs: dict) -> np.ndarray:
    """float32 [out, in] from packed codes and group parameters."""
    n_in = attrs["in_features"]
    q = unpack(qweight, attrs["bits"], n_in).astype(np.float32)
    size = n_in if attrs["group_size"] == -1 else attrs["group_size"]
    group = np.arange(n_in) // size
    z = np.float32(1 << (attrs["bits"] - 1)) if zeros is None else zeros.astype(np.float32)[:, group]
    return (q - z) * scales.astype(np.float32)[:, group]


def _qlinear_ref(xs, attrs, ctx):
    zeros = None if attrs["sym"] else xs[3]
    w = dequantize_packed(xs[1], xs[2], zeros, attrs)
    y = as_float(xs[0]) @ w.T
    if attrs.get("has_bias"):
        y = y + as_float(xs[-1])
    return [y]


register("qlinear", (3, 5), _qlinear_infer, _qlinear_ref)

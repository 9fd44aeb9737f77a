"""Quantized IR ops: `qlinear`, a linear whose weight is packed b-bit codes with group scales (zeros, offsets)."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.ops.registry import COMPUTE_DTYPE, as_float, check, register
from bitsmith.runtime.packed_layout import packed_shape, unpack

# qlinear(x[..., in], qweight uint32[out, words], scales[out, groups], (zeros[out, groups]),
#         (super_scales f16[out, supers]), (super_zeros f16[out, supers]), (perm int32[in]), (bias[out]))
#   attrs: bits, group_size (-1: per channel), in_features, sym (no zeros input), offset (min form),
#          super_group (0, or 256: two-level scales), has_perm, has_bias; missing ones take the defaults
#          offset False, super_group 0, has_perm False (artifacts written before they existed)
#   s[o, g] = scales[o, g] (f16), or with super_group f32(super_scales[o, g // (256 / G)]) * f32(scales[o, g]) (int8)
#   sym:  w[o, c] = (q - 2^(bits-1)) * s      asym: w[o, c] = (q - z) * s, z = zeros (f16)
#   min (offset): w[o, c] = s * q + m,   m = zeros (f16), or with super_group f32(super_zeros) * f32(zeros) (int8)
#   g = c // group; columns c are stored in act-order when has_perm: y = x[..., perm] @ w.T (+ bias)
#   layout of qweight: bitsmith.runtime.packed_layout

DEFAULTS = {"offset": False, "super_group": 0, "has_perm": False, "has_bias": False}


def qlinear_input_names(attrs: dict) -> list[str]:
    """The node's inputs after x, in order, for these attrs (qweight, scales, [zeros], ..., [bias])."""
    a = DEFAULTS | attrs
    names = ["qweight", "scales"] + ([] if a["sym"] else ["zeros"])
    if a["super_group"]:
        names += ["super_scales"] + (["super_zeros"] if a["offset"] else [])
    return names + (["perm"] if a["has_perm"] else []) + (["bias"] if a["has_bias"] else [])


def _groups(attrs: dict) -> int:
    size = attrs["in_features"] if attrs["group_size"] == -1 else attrs["group_size"]
    return -(-attrs["in_features"] // size)


def _qlinear_infer(in_types, attrs, weights):
    names = qlinear_input_names(attrs)
    check(len(in_types) == 1 + len(names), f"qlinear expects {1 + len(names)} inputs (x, {', '.join(names)}), "
          f"got {len(in_types)}")
    x, qweight = in_types[:2]
    typed = dict(zip(names, in_types[1:]))
    n_in = attrs["in_features"]
    check(x.shape[-1] == n_in, f"qlinear input has {x.shape[-1]} features, weight expects {n_in}")
    out = qweight.shape[0]
    check(qweight.dtype == "uint32" and qweight.shape == packed_shape(out, n_in, attrs["bits"]),
          f"qweight {qweight} does not hold {out}x{n_in} {attrs['bits']}-bit codes")
    groups = (out, _groups(attrs))
    for name in ("scales", "zeros"):
        if name in typed:
            check(typed[name].shape == groups, f"{name} {typed[name].shape} != {groups}")
    supers = (out, -(-n_in // attrs["super_group"])) if attrs.get("super_group") else None
    for name in ("super_scales", "super_zeros"):
        if name in typed:
            check(typed[name].shape == supers, f"{name} {typed[name].shape} != {supers}")
    if "perm" in typed:
        check(typed["perm"].shape == (n_in,), f"perm {typed['perm'].shape} != ({n_in},)")
    if "bias" in typed:
        check(typed["bias"].shape == (out,), f"bias {typed['bias'].shape} != ({out},)")
    return [TensorType(x.shape[:-1] + (out,), COMPUTE_DTYPE)]


def _two_level(codes: np.ndarray, supers: np.ndarray | None, attrs: dict, group: np.ndarray) -> np.ndarray:
    """float32 [out, in]: codes per group, times super per 256 columns when two-level (products in float32)."""
    values = codes.astype(np.float32)[:, group]
    if supers is None:
        return values
    return supers.astype(np.float32)[:, np.arange(attrs["in_features"]) // attrs["super_group"]] * values


def dequantize_packed(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, attrs: dict,
                      super_scales: np.ndarray | None = None, super_zeros: np.ndarray | None = None) -> np.ndarray:
    """float32 [out, in] from packed codes and group parameters, in the stored (act-order when permuted) order."""
    a = DEFAULTS | attrs
    n_in = a["in_features"]
    q = unpack(qweight, a["bits"], n_in).astype(np.float32)
    size = n_in if a["group_size"] == -1 else a["group_size"]
    group = np.arange(n_in) // size
    s = _two_level(scales, super_scales if a["super_group"] else None, a, group)
    if a["offset"]:
        return s * q + _two_level(zeros, super_zeros if a["super_group"] else None, a, group)
    z = np.float32(1 << (a["bits"] - 1)) if zeros is None else zeros.astype(np.float32)[:, group]
    return (q - z) * s


def _qlinear_ref(xs, attrs, ctx):
    inputs = dict(zip(qlinear_input_names(attrs), xs[1:]))
    w = dequantize_packed(inputs["qweight"], inputs["scales"], inputs.get("zeros"), attrs,
                          inputs.get("super_scales"), inputs.get("super_zeros"))
    x = as_float(xs[0])
    if "perm" in inputs:  # act-order: stored column c is original column perm[c]
        x = x[..., np.asarray(inputs["perm"], dtype=np.int64)]
    y = x @ w.T
    if "bias" in inputs:
        y = y + as_float(inputs["bias"])
    return [y]


register("qlinear", (3, 8), _qlinear_infer, _qlinear_ref)

"""Quantized IR ops: `qlinear` (packed b-bit codes with group scales, zeros, offsets) and `int8_activations`."""

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
ACTIVATION_BLOCK = 32  # int8-activation kernels: one scale per 32 consecutive input values of a row
INT8_ACTIVATION_BITS = (4, 8)  # codegen/gemv_int8.py I8_BITS: the code widths those kernels read


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


def reads_int8_activations(attrs: dict) -> bool:
    """Whether the int8-activation build quantizes this qlinear's input: 4/8-bit codes in a form other than the
    imported ones (groups of 16, min form, two-level scales), as lower_linear decides with
    codegen/spec_checks.imported_form_problems (the others keep float32 activations)."""
    a = DEFAULTS | attrs
    return (a["bits"] in INT8_ACTIVATION_BITS and a["group_size"] != 16 and not a["offset"]
            and not a["super_group"])


def round_int8_activations(x: np.ndarray) -> np.ndarray:
    """float32 x [..., in] as the int8-activation GEMVs see it (gemv_int8_tir.py, gemv_x16.py, gemv_int8_neon.py):
    per row and per block of 32 values (the last one partial), amax = max|x|, xq = clip(rint(x * (127 / amax)),
    -127, 127) in float32 (0 when amax = 0), and the value xq * (amax / 127). The kernels multiply the codes xq
    in integers and scale the block's sum once; this is the same product up to float32 summation order."""
    x = as_float(x)
    n_in = x.shape[-1]
    pad = -n_in % ACTIVATION_BLOCK
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
    xb = xb.reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)  # [..., blocks, 32]; zero padding leaves amax alone
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), np.float32(0.0)).astype(np.float32)
    codes = np.clip(np.rint(xb * inv), -127, 127)
    out = codes * (amax / np.float32(127.0))
    return out.reshape(*x.shape[:-1], n_in + pad)[..., :n_in]


def _qlinear_ref(xs, attrs, ctx):
    inputs = dict(zip(qlinear_input_names(attrs), xs[1:]))
    w = dequantize_packed(inputs["qweight"], inputs["scales"], inputs.get("zeros"), attrs,
                          inputs.get("super_scales"), inputs.get("super_zeros"))
    x = as_float(xs[0])
    if "perm" in inputs:  # act-order: stored column c is original column perm[c]
        x = x[..., np.asarray(inputs["perm"], dtype=np.int64)]
    if ctx.activations == "int8" and reads_int8_activations(attrs):  # after the gather, as the kernels do
        x = round_int8_activations(x)
    y = x @ w.T
    if "bias" in inputs:
        y = y + as_float(inputs["bias"])
    return [y]


register("qlinear", (3, 8), _qlinear_infer, _qlinear_ref)


# int8_activations(x[..., in]) -> [..., in], attrs {}: round_int8_activations as an explicit node, for modules whose
# qlinears were replaced by dense linears (tools/evaluate.py densify) and that still score int8 activations;
# never lowered to kernels (the int8 GEMVs do this inside)
def _same_type_infer(in_types, attrs, weights):
    return [TensorType(in_types[0].shape, COMPUTE_DTYPE)]


register("int8_activations", (1, 1), _same_type_infer, lambda xs, attrs, ctx: [round_int8_activations(xs[0])])

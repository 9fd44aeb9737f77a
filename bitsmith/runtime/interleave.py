"""The 16-row interleaved weight layout of the int8-activation kernels (codegen/gemv_x16.py), from codes.

Per group of 16 output rows and block of 32 inputs, 16 * 32 * bits / 8 bytes: 64-byte vectors whose
byte 4 o + t holds row o's code of input 4 c + t (int8: vector c = 0..7; int4: vector v = 0..3 holds
c = 2 v in its low nibbles and c = 2 v + 1 in its high ones):

    int4, one (group, block), 4 vectors x 64 bytes:
      vector v   byte:  0        1        2        3        4        5   ...  63
      low  nibble:     r0 k8v   r0 k8v+1 r0 k8v+2 r0 k8v+3 r1 k8v   r1 ...   r15 k8v+3
      high nibble:     r0 k8v+4 r0 k8v+5 r0 k8v+6 r0 k8v+7 r1 k8v+4 r1 ...   r15 k8v+7

Scales and zeros [out, groups] become [out / 16, groups, 16]: one 16-lane vector per (group of rows,
scale group).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitsmith.runtime.packed_layout import unpack

ROWS, BLOCK = 16, 32


def interleave_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [out, in] (out % 16 == 0, in % 32 == 0) -> uint8 [out / 16, in / 32, 16 * 32 * bits / 8]."""
    out_f, in_f = codes.shape
    c = codes.reshape(out_f // ROWS, ROWS, in_f // BLOCK, 8, 4)  # (group, row, block, c, t)
    if bits == 8:
        return np.ascontiguousarray(c.transpose(0, 2, 3, 1, 4)).reshape(out_f // ROWS, in_f // BLOCK, -1)
    pairs = c.reshape(out_f // ROWS, ROWS, in_f // BLOCK, 4, 2, 4)  # c = 2 v + plane
    byte = pairs[..., 0, :] | (pairs[..., 1, :] << 4)  # (group, row, block, v, t)
    return np.ascontiguousarray(byte.transpose(0, 2, 3, 1, 4)).reshape(out_f // ROWS, in_f // BLOCK, -1)


def deinterleave_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `interleave_codes`: uint8 [out / 16, in / 32, bytes] -> codes [out, in]."""
    groups, blocks, _ = packed.shape
    if bits == 8:
        c = packed.reshape(groups, blocks, 8, ROWS, 4).transpose(0, 3, 1, 2, 4)
        return np.ascontiguousarray(c).reshape(groups * ROWS, blocks * BLOCK)
    byte = packed.reshape(groups, blocks, 4, ROWS, 4)  # (group, block, v, row, t)
    planes = np.stack([byte & 0x0F, byte >> 4], axis=3)  # (group, block, v, plane, row, t)
    return np.ascontiguousarray(planes.transpose(0, 4, 1, 2, 3, 5)).reshape(groups * ROWS, blocks * BLOCK)


def interleave_packed(words: np.ndarray, bits: int, in_features: int) -> np.ndarray | None:
    """`interleave_codes(unpack(words, bits, in_features), bits)` straight from the packed words, as one
    permutation (8-bit) or eight nibble planes and one permutation (4-bit), without the codes array: 3-4x
    faster when loading. None where rows have a partial packed block (in % 64 (8-bit) / 128 (4-bit)) or out % 16.

    Packed (packed_layout.py): in a block, word l holds slot j of input j * 16 + l. The x16 layout wants, per
    32 inputs, byte 4 o + t of vector c (8-bit: input 4 c + t) or v (4-bit: inputs 8 v + t and 8 v + 4 + t).
    """
    out_f = words.shape[0]
    per_block = 16 * (32 // bits)
    if bits not in (4, 8) or out_f % ROWS or in_features % per_block or words.shape[1] * 32 != in_features * bits:
        return None
    blocks = in_features // per_block
    if bits == 8:
        # bytes [g, o, kb, lq, t, jb, jp] (word l = 4 lq + t, slot j = 2 jb + jp) -> [g, kb, jb, jp, lq, o, t]
        b = words.view(np.uint8).reshape(out_f // ROWS, ROWS, blocks, 4, 4, 2, 2)
        return np.ascontiguousarray(b.transpose(0, 2, 5, 6, 3, 1, 4)).reshape(out_f // ROWS, in_features // BLOCK, -1)
    # byte k of word l = 8 vl + 4 h + t holds slots j = 2 k (low nibble) and 2 k + 1 (high); the x16 byte of slot j
    # pairs lane h = 0 (low nibble) with h = 1 (high), and j = 2 m + vj puts it in 32-block m, vector v = 2 vj + vl
    b = words.view(np.uint8).reshape(out_f // ROWS, ROWS, blocks, 2, 2, 4, 4)  # [g, o, kb, vl, h, t, k]
    lo, hi = b[:, :, :, :, 0], b[:, :, :, :, 1]
    planes = np.empty(lo.shape + (2,), dtype=np.uint8)  # [g, o, kb, vl, t, k, vj]
    planes[..., 0] = (lo & 0x0F) | (hi << 4)
    planes[..., 1] = (lo >> 4) | (hi & 0xF0)
    return np.ascontiguousarray(planes.transpose(0, 2, 5, 6, 3, 1, 4)).reshape(out_f // ROWS, in_features // BLOCK, -1)


def interleave_rows(params: np.ndarray) -> np.ndarray:
    """Scales or zeros [out, groups] -> [out / 16, groups, 16]."""
    out_f, groups = params.shape
    return np.ascontiguousarray(params.reshape(out_f // ROWS, ROWS, groups).transpose(0, 2, 1))


# Kernel plans name an interleaved copy of an artifact weight "<name>@x16:b<bits>:k<in>" (packed codes)
# or "<name>@x16" (scales, zeros); the runtime builds it from the artifact's packed weight when it loads.
X16 = "@x16"


def x16_name(name: str, bits: int | None = None, in_features: int | None = None) -> str:
    """The plan's name of `name` in the interleaved layout (codes: give bits and in_features)."""
    return f"{name}{X16}" if bits is None else f"{name}{X16}:b{bits}:k{in_features}"


def kernel_weight_layout(name: str, weights: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the array `kernel_weight(name, weights)` returns, without building it; `weights` maps
    names to anything with .shape and .dtype (arrays, StoredTensors)."""
    base, found, layout = name.partition(X16)
    source = weights[base]
    if not found:
        return tuple(source.shape), np.dtype(source.dtype)
    if not layout:
        return (int(np.prod(source.shape)),), np.dtype(source.dtype)
    bits, in_features = (int(part[1:]) for part in layout.lstrip(":").split(":"))
    return (source.shape[0] * in_features * bits // 8,), np.dtype(np.uint8)


def kernel_weight(name: str, weights: Any) -> np.ndarray:
    """The array a kernel plan's weight `name` refers to: the artifact's, or its interleaved copy (flat)."""
    base, found, layout = name.partition(X16)
    if not found:
        return weights[name]
    source = np.asarray(weights[base])
    if not layout:  # scales or zeros
        return interleave_rows(source).reshape(-1)
    bits, in_features = (int(part[1:]) for part in layout.lstrip(":").split(":"))
    fast = interleave_packed(source, bits, in_features)
    if fast is not None:
        return fast.reshape(-1)
    return interleave_codes(unpack(source, bits, in_features), bits).reshape(-1)

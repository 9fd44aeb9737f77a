"""GGUF block bytes <-> QuantizedWeight, bit-exact both ways, for the ggml types that map onto a scheme exactly.

API (pure numpy; `kind` is the ggml type name, e.g. "Q4_K"):
    GGUF_SCHEMES[kind]            -> the QuantScheme (method "imported") the type maps onto exactly
    decode(kind, data, in_features) -> QuantizedWeight; data: uint8 [out, in / block * type_size] (GGUFReader's
                                     tensor.data of a 2-D tensor, one row of blocks per output row)
    encode(qw, kind=None)         -> uint8 [out, row bytes]; the same bytes decode() read (kind defaults to
                                     gguf_kind(qw.scheme)); refuses codes/scales outside the type's fields
    gguf_kind(scheme)             -> the ggml type name of a scheme, or None when no type holds it exactly
dequantize(decode(kind, data, n)) equals gguf.quants.dequantize(data, kind) bit for bit in float32, and
encode(decode(kind, data, n)) == data for every byte pattern (every bit of these block formats is a field).

Field mapping (per output row; G = group size, nb = blocks per row):
    legacy (block 32):  scales = d f16 [nb]; zeros = m f16 [nb] (Q4_1/Q5_1 min form, w = d*q + m)
                        codes: Q4_0 q (w = (q-8)d), Q5_0 q (w = (q-16)d), Q8_0 int8 + 128 (w = (q-128)d)
    K-quants (256):     super_scales = d f16 [nb]; scales = int8 sub-block codes [nb * 256/G];
                        min form (Q2_K, Q4_K, Q5_K): zeros = int8 min codes, super_zeros = -dmin (sign bit flipped)
                        Q3_K: scales = 6-bit sc - 32, codes = 3-bit q + 4 (w = d*(sc-32)*(code-4))
                        Q6_K: scales = int8 sc, codes = 6-bit q (w = d*sc*(q-32))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme

QK_K = 256
_FIX = "keep this tensor dequantized (float), or export it as a type that holds its scheme"


def _scheme(bits: int, group: int, form: str, super_group: int = 0) -> QuantScheme:
    return QuantScheme(bits=bits, group_size=group, sym=form == "sym", method="imported", offset=form == "min",
                       super_group=super_group)


# ggml type -> (scheme, values per block, bytes per block)
_TYPES: dict[str, tuple[QuantScheme, int, int]] = {
    "Q4_0": (_scheme(4, 32, "sym"), 32, 18),
    "Q4_1": (_scheme(4, 32, "min"), 32, 20),
    "Q5_0": (_scheme(5, 32, "sym"), 32, 22),
    "Q5_1": (_scheme(5, 32, "min"), 32, 24),
    "Q8_0": (_scheme(8, 32, "sym"), 32, 34),
    "Q2_K": (_scheme(2, 16, "min", QK_K), QK_K, 84),
    "Q3_K": (_scheme(3, 16, "sym", QK_K), QK_K, 110),
    "Q4_K": (_scheme(4, 32, "min", QK_K), QK_K, 144),
    "Q5_K": (_scheme(5, 32, "min", QK_K), QK_K, 176),
    "Q6_K": (_scheme(6, 16, "sym", QK_K), QK_K, 210),
}
GGUF_SCHEMES: dict[str, QuantScheme] = {kind: spec[0] for kind, spec in _TYPES.items()}
# sub-block scale / min code ranges of the K-quants (what encode() accepts)
_SC_RANGE = {"Q2_K": (0, 15), "Q3_K": (-32, 31), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}


@dataclass
class _Blocks:
    """One tensor's blocks, flattened: N blocks of B values. d/m float16 [N] (m: Q4_1/Q5_1's min or the K-quants'
    dmin), sc/mn int8 [N, B/G] (K-quant sub-block scale and min codes), codes uint8 [N, B] (what q holds)."""

    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None
    sc: np.ndarray | None = None
    mn: np.ndarray | None = None


def gguf_kind(scheme: QuantScheme) -> str | None:
    """The ggml type a scheme is exactly (method aside), or None."""
    for kind, mapped in GGUF_SCHEMES.items():
        if (mapped.bits, mapped.group_size, mapped.sym, mapped.offset, mapped.super_group) == (
                scheme.bits, scheme.group_size, scheme.sym, scheme.offset, scheme.super_group):
            return kind
    return None


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one row of `in_features` values in `kind`."""
    _, block, size = _TYPES[kind]
    return in_features // block * size


# ----------------------------------------------------------------------------------------------- bit helpers


def _nibbles(b: np.ndarray, lanes: int) -> np.ndarray:
    """uint8 [N, c*lanes] -> [N, c, 2, lanes]: low nibble first, then the high nibble of the same bytes."""
    x = b.reshape(b.shape[0], -1, 1, lanes)
    return (x >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)


def _pack_nibbles(v: np.ndarray, lanes: int) -> np.ndarray:
    """Inverse of _nibbles: values [N, c*2*lanes] (low half of each chunk, then the high half) -> bytes."""
    x = v.reshape(v.shape[0], -1, 2, lanes)
    return (x[:, :, 0] | (x[:, :, 1] << np.uint8(4))).reshape(v.shape[0], -1)


def _crumbs(b: np.ndarray) -> np.ndarray:
    """uint8 [N, c*32] -> 2-bit fields [N, c, 4, 32] (bits 0-1, 2-3, 4-5, 6-7 of 32 bytes)."""
    x = b.reshape(b.shape[0], -1, 1, 32)
    return (x >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)


def _pack_crumbs(v: np.ndarray) -> np.ndarray:
    x = v.reshape(v.shape[0], -1, 4, 32)
    return (x[:, :, 0] | (x[:, :, 1] << 2) | (x[:, :, 2] << 4) | (x[:, :, 3] << 6)).astype(np.uint8).reshape(
        v.shape[0], -1)


def _bitplanes(b: np.ndarray) -> np.ndarray:
    """uint8 [N, 32] -> bits [N, 8, 32]: element k*32 + l is bit k of byte l (Q3_K hmask, Q5_K qh)."""
    return (b.reshape(b.shape[0], 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)


def _pack_bitplanes(bits: np.ndarray) -> np.ndarray:
    x = bits.reshape(bits.shape[0], 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return np.bitwise_or.reduce(x, axis=1)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).reshape(-1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def _neg(x: np.ndarray) -> np.ndarray:
    """-x for float16 by flipping the sign bit (no arithmetic, so every bit pattern, NaNs too, round-trips)."""
    return (np.ascontiguousarray(x, dtype=np.float16).view(np.uint16) ^ np.uint16(0x8000)).view(np.float16)


# K-quant 12-byte packed 6-bit scales and mins (Q4_K, Q5_K): bytes 0-3 d, 4-7 m, 8-11 md
#   sc[j<4] = d[j] & 63          sc[j>=4] = (md[j-4] & 15) | (d[j-4] >> 6) << 4
#   mn[j<4] = m[j] & 63          mn[j>=4] = (md[j-4] >> 4) | (m[j-4] >> 6) << 4
def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=1)
    return sc.astype(np.int8), mn.astype(np.int8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    d = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 15) | (mn[:, 4:] << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


# Q3_K 12-byte packed 6-bit scales: low nibbles in bytes 0-7 (j < 8: low nibble of byte j, else high nibble of
# byte j - 8), high 2 bits in bytes 8-11 (j = k*4 + b: bits 2k..2k+1 of byte 8 + b); stored value = sc + 32
def _q3_scales(s: np.ndarray) -> np.ndarray:
    low = _nibbles(s[:, :8], 8).reshape(-1, 16)
    high = ((s[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3).reshape(-1, 16)
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    low = _pack_nibbles(u & 15, 8)
    hi = (u >> 4).reshape(-1, 4, 4)
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


# ------------------------------------------------------------------------------------------- per-type codecs


def _split(b: np.ndarray, *sizes: int) -> list[np.ndarray]:
    return np.hsplit(b, np.cumsum(sizes)[:-1])


def _decode_blocks(kind: str, b: np.ndarray) -> _Blocks:
    """uint8 [N, type_size] -> fields (layouts: ggml-common.h's block_* structs)."""
    n = b.shape[0]
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        has_min, five = kind.endswith("_1"), kind.startswith("Q5")
        parts = _split(b, 2, 2 if has_min else 0, 4 if five else 0, 16)
        codes = _nibbles(parts[3], 16).reshape(n, 32)  # qs[j]: element j low nibble, element j + 16 high
        if five:  # qh: little-endian 32-bit mask, bit j = bit 4 of element j
            codes = codes | (np.unpackbits(parts[2], axis=1, bitorder="little") << np.uint8(4))
        return _Blocks(codes, _f16(parts[0]), _f16(parts[1]) if has_min else None)
    if kind == "Q8_0":
        d, qs = _split(b, 2, 32)
        return _Blocks(qs ^ np.uint8(0x80), _f16(d))  # int8 q + 128 == its byte with the top bit flipped
    if kind == "Q2_K":  # scales[16] (low nibble sc, high nibble min), qs[64], d, dmin
        scales, qs, d, dmin = _split(b, 16, 64, 2, 2)
        return _Blocks(_crumbs(qs).reshape(n, QK_K), _f16(d), _f16(dmin), (scales & 15).astype(np.int8),
                       (scales >> 4).astype(np.int8))
    if kind == "Q3_K":  # hmask[32], qs[64], scales[12], d; q = low 2 bits - 4 * (1 - hmask bit)
        hmask, qs, scales, d = _split(b, 32, 64, 12, 2)
        codes = _crumbs(qs).reshape(n, QK_K) | (_bitplanes(hmask).reshape(n, QK_K) << np.uint8(2))
        return _Blocks(codes, _f16(d), sc=_q3_scales(scales))
    if kind in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], [qh[32]], qs[128]
        five = kind == "Q5_K"
        d, dmin, scales, qh, qs = _split(b, 2, 2, 12, 32 if five else 0, 128)
        codes = _nibbles(qs, 32).reshape(n, QK_K)  # sub-block 2c low nibbles of qs[32c:32c+32], 2c+1 high
        if five:
            codes = codes | (_bitplanes(qh).reshape(n, QK_K) << np.uint8(4))
        sc, mn = _k_scales(scales)
        return _Blocks(codes, _f16(d), _f16(dmin), sc, mn)
    if kind == "Q6_K":  # ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d
        ql, qh, scales, d = _split(b, 128, 64, 16, 2)
        codes = _nibbles(ql, 64).reshape(n, QK_K) | (_crumbs(qh).reshape(n, QK_K) << np.uint8(4))
        return _Blocks(codes, _f16(d), sc=scales.view(np.int8).copy())
    raise BitsmithError(f"ggml type {kind!r} has no exact scheme", where="gguf_blocks",
                        fix=f"use one of {sorted(_TYPES)}, or dequantize it")


def _encode_blocks(kind: str, x: _Blocks) -> np.ndarray:
    """Inverse of _decode_blocks: fields -> uint8 [N, type_size]."""
    c = x.codes
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        parts = [_f16_bytes(x.d)]
        if kind.endswith("_1"):
            parts.append(_f16_bytes(x.m))
        if kind.startswith("Q5"):
            parts.append(np.packbits((c >> 4) & 1, axis=1, bitorder="little"))
        parts.append(_pack_nibbles(c & 15, 16))
    elif kind == "Q8_0":
        parts = [_f16_bytes(x.d), c ^ np.uint8(0x80)]
    elif kind == "Q2_K":
        sc, mn = x.sc.astype(np.uint8), x.mn.astype(np.uint8)
        parts = [sc | (mn << 4), _pack_crumbs(c), _f16_bytes(x.d), _f16_bytes(x.m)]
    elif kind == "Q3_K":
        parts = [_pack_bitplanes(c >> 2), _pack_crumbs(c & 3), _pack_q3_scales(x.sc), _f16_bytes(x.d)]
    elif kind in ("Q4_K", "Q5_K"):
        parts = [_f16_bytes(x.d), _f16_bytes(x.m), _pack_k_scales(x.sc, x.mn)]
        if kind == "Q5_K":
            parts.append(_pack_bitplanes(c >> 4))
        parts.append(_pack_nibbles(c & 15, 32))
    elif kind == "Q6_K":
        parts = [_pack_nibbles(c & 15, 64), _pack_crumbs(c >> 4), x.sc.view(np.uint8), _f16_bytes(x.d)]
    else:
        raise BitsmithError(f"ggml type {kind!r} has no exact scheme", where="gguf_blocks",
                            fix=f"use one of {sorted(_TYPES)}")
    return np.ascontiguousarray(np.concatenate([p.astype(np.uint8) for p in parts], axis=1))


# --------------------------------------------------------------------------------------------- tensor level


def decode(kind: str, data: np.ndarray, in_features: int) -> QuantizedWeight:
    """A 2-D GGUF tensor's bytes (uint8 [out, row bytes]) as a QuantizedWeight of GGUF_SCHEMES[kind]."""
    if kind not in _TYPES:
        raise BitsmithError(f"ggml type {kind!r} has no exact scheme", where="gguf_blocks.decode",
                            fix=f"use one of {sorted(_TYPES)}, or dequantize it")
    scheme, block, size = _TYPES[kind]
    data = np.ascontiguousarray(data).view(np.uint8)
    out = data.shape[0] if data.ndim == 2 else 1
    if in_features % block or data.size != out * row_bytes(kind, in_features):
        raise BitsmithError(f"{kind} data of shape {data.shape} does not hold {out} rows of {in_features} values",
                            where="gguf_blocks.decode", fix="pass tensor.data of a 2-D tensor and its row length")
    x = _decode_blocks(kind, data.reshape(-1, size))
    nb = in_features // block
    q = x.codes.reshape(out, in_features)
    if scheme.super_group:
        sub = scheme.super_group // scheme.group_size
        return QuantizedWeight(q, x.sc.reshape(out, nb * sub), None if x.mn is None else x.mn.reshape(out, nb * sub),
                               scheme, in_features, super_scales=x.d.reshape(out, nb),
                               super_zeros=None if x.m is None else _neg(x.m).reshape(out, nb))
    return QuantizedWeight(q, x.d.reshape(out, nb), None if x.m is None else x.m.reshape(out, nb), scheme,
                           in_features)


def encode(qw: QuantizedWeight, kind: str | None = None) -> np.ndarray:
    """uint8 [out, row bytes]: the GGUF blocks of `qw` (exact; a field the type cannot hold is refused)."""
    kind = kind or gguf_kind(qw.scheme)
    where = f"gguf_blocks.encode {qw.scheme.name}"
    if kind is None or kind not in _TYPES or gguf_kind(qw.scheme) != kind:
        raise BitsmithError(f"no GGUF type holds scheme {qw.scheme.name} exactly (asked for {kind})", where=where,
                            fix="exact types: " + ", ".join(f"{k} = {s.name}" for k, s in GGUF_SCHEMES.items()))
    _, block, _ = _TYPES[kind]
    if qw.perm is not None:
        raise BitsmithError("act-order (perm) weights have no GGUF form", where=where,
                            fix="un-permute the columns and requantize, or export another format")
    if qw.in_features % block:
        raise BitsmithError(f"{kind} needs rows that are a multiple of {block} values, got {qw.in_features}",
                            where=where, fix=_FIX)
    if int(qw.q.max(initial=0)) > qw.scheme.qmax:
        raise BitsmithError(f"codes above {qw.scheme.qmax} do not fit {kind}", where=where, fix=_FIX)
    out, n = qw.out_features, qw.in_features // block
    codes = qw.q.reshape(out * n, block)
    if not qw.scheme.super_group:
        m = None if qw.zeros is None else qw.zeros.reshape(-1)
        return _encode_blocks(kind, _Blocks(codes, qw.scales.reshape(-1), m)).reshape(out, -1)
    lo, hi = _SC_RANGE[kind]
    for label, codes_of in (("scales", qw.scales), ("zeros", qw.zeros)):
        if codes_of is not None and (codes_of.min() < lo or codes_of.max() > hi):
            raise BitsmithError(f"{label} codes outside {kind}'s [{lo}, {hi}]", where=where, fix=_FIX)
    sub = block // qw.scheme.group_size
    mn = None if qw.zeros is None else qw.zeros.reshape(-1, sub)
    dmin = None if qw.super_zeros is None else _neg(qw.super_zeros).reshape(-1)
    fields = _Blocks(codes, qw.super_scales.reshape(-1), dmin, qw.scales.reshape(-1, sub), mn)
    return _encode_blocks(kind, fields).reshape(out, -1)

"""Pure-numpy codecs of pre-quantized HF checkpoint layouts (GPTQ, AWQ GEMM, compressed-tensors pack-quantized).

The importer (frontends/hf_quantized.py) uses the `unpack_*` functions; the exporter (tools/export_hf.py) writes
the same layouts with the `pack_*` inverses, so import(export(A)) round-trips through one definition of each layout.

Every layout below stores B-bit codes as a dense little-endian bit stream in int32 words along one axis:
code k of the axis occupies global bits [k*B, (k+1)*B), word w holds global bits [32w, 32w+32), LSB first.
For B in (2, 4, 8) a code never straddles a word; for B = 3 (GPTQ, compressed-tensors >= 0.10) every 32 codes
fill exactly 3 words and codes 10 and 21 straddle:

    word 0: c0 c1 .. c9 [c10 lo 2]   word 1: [c10 hi 1] c11 .. c20 [c21 lo 1]   word 2: [c21 hi 2] c22 .. c31
    bit:    0  3     27  30                  0          1       28  31                 0          2       29

Per format (W is the nn.Linear weight [out, in]; q the unsigned codes in [0, 2^B); g groups along `in`):
  GPTQ  qweight int32 [in*B/32, out]  stream along axis 0 (in);   qzeros int32 [g, out*B/32] stream along axis 1;
        scales fp16 [g, out]; g_idx int32 [in] = group of each input column (arbitrary order under act-order);
        W[o, c] = scales[g_idx[c], o] * (q[c, o] - z[g_idx[c], o]), with z = stored + 1 in the v1 checkpoint
        format ("gptq": the writer subtracted 1) and z = stored in v2 ("gptq_v2").
  AWQ   GEMM qweight int32 [in, out*B/32] stream along axis 1 (out), and for B = 4 the eight nibbles of a word
        hold output columns in the order AWQ_ORDER (nibble i <- column 8j + AWQ_ORDER[i]); qzeros int32
        [g, out*B/32] the same way; scales fp16 [g, out]; groups contiguous; W[o, c] = (q - z) * s.
  compressed-tensors pack-quantized: weight_packed int32 [out, ceil(in*B/32)] stream along axis 1 of the codes
        q = signed + 2^(B-1); weight_scale [out, g] (fp16/bf16/fp32; channel: g = 1); weight_zero_point (asym only)
        int32 [ceil(out*B/32), g] stream along axis 0 of zp + 2^(B-1) (older writers: int8 [out, g] signed);
        weight_g_idx int32 [in] under actorder="group"; W = (signed - zp) * scale = (q - z) * s with z = zp + 2^(B-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed word holds output column 8j + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8j + c is nibble AWQ_REVERSE_ORDER[c]


class FormatError(ValueError):
    """A tensor does not have the shape or dtype its layout requires (the frontend adds file and tensor names)."""


@dataclass(frozen=True)
class UnpackedCodes:
    """One linear layer's codes in the nn.Linear orientation, in the ORIGINAL input-column order.

    q uint8 [out, in] in [0, 2^bits); scales [out, n_groups] in the checkpoint's own float dtype (not rounded);
    zeros int32 [out, n_groups]: integer zero points in code units (v1 GPTQ may give 2^bits); None means the
    format's symmetric zero 2^(bits-1); g_idx int32 [in]: the group of each input column."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    g_idx: np.ndarray
    bits: int

    def zero_points(self) -> np.ndarray:
        """int32 [out, n_groups]: the zero points, the symmetric constant filled in."""
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.int32)

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]: (q - z) * s per column's group, the product taken in float32 (exact for fp16/bf16
        scales: an 11-bit significand times a code difference under 2^9 fits float32's 24 bits)."""
        w = self.q.astype(np.float32)
        w -= self.zero_points().astype(np.float32)[:, self.g_idx]  # in place: fewer [out, in] temporaries
        w *= self.scales.astype(np.float32)[:, self.g_idx]
        return w


def packed_length(count: int, bits: int) -> int:
    """int32 words that hold `count` codes of `bits` bits as a dense stream: ceil(count * bits / 32)."""
    return -(-count * bits // 32)


def unpack_bits(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """uint8 codes: `count` codes of `bits` bits read from the dense int32 stream along `axis` (see module doc)."""
    if not 1 <= bits <= 8:
        raise FormatError(f"cannot unpack {bits}-bit codes (1..8 bits)")
    words = np.asarray(words)
    if words.dtype not in (np.int32, np.uint32):
        raise FormatError(f"packed codes are {words.dtype}, want int32")
    if words.shape[axis] != packed_length(count, bits):
        raise FormatError(f"packed axis {axis} has {words.shape[axis]} words; {count} codes of {bits} bits "
                          f"need {packed_length(count, bits)}")
    w = np.moveaxis(words.view(np.uint32), axis, -1)
    n = w.shape[-1]
    blocks = -(-n // bits)  # every `bits` words hold exactly 32 codes
    if blocks * bits != n:
        w = np.concatenate([w, np.zeros(w.shape[:-1] + (blocks * bits - n,), np.uint32)], axis=-1)
    w = w.reshape(w.shape[:-1] + (blocks, bits))
    out = np.empty(w.shape[:-1] + (32,), np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        value = w[..., word] >> np.uint32(shift)
        if shift + bits > 32:  # straddles into the next word: its low bits are this code's high bits
            value |= w[..., word + 1] << np.uint32(32 - shift)
        out[..., k] = value & mask
    out = out.reshape(out.shape[:-2] + (blocks * 32,))[..., :count]
    return np.moveaxis(out, -1, axis)


def _contiguous_groups(in_features: int, group_size: int) -> np.ndarray:
    return (np.arange(in_features) // (group_size if group_size > 0 else in_features)).astype(np.int32)


def _check_groups(g_idx: np.ndarray, n_groups: int, in_features: int) -> np.ndarray:
    g_idx = np.asarray(g_idx).astype(np.int32).reshape(-1)
    if g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise FormatError(f"g_idx has shape {g_idx.shape} and values in [{g_idx.min()}, {g_idx.max()}]; want "
                          f"({in_features},) in [0, {n_groups})")
    return g_idx


def unpack_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                bits: int, group_size: int, v1: bool) -> UnpackedCodes:
    """GPTQ (AutoGPTQ / GPTQModel) tensors of one layer -> codes; `v1`: zeros are stored minus one."""
    scales = np.asarray(scales)
    n_groups, out = scales.shape
    # g_idx pins `in` exactly; without it, the stream is whole words: in = rows * 32 / bits
    in_features = int(np.asarray(g_idx).size) if g_idx is not None else qweight.shape[0] * 32 // bits
    if qweight.shape[1] != out:
        raise FormatError(f"qweight is {tuple(qweight.shape)}, scales {tuple(scales.shape)}: output sizes differ")
    q = unpack_bits(qweight, bits, in_features, axis=0).T  # [out, in]
    z = unpack_bits(qzeros, bits, out, axis=1).astype(np.int32).T  # [out, n_groups]
    if z.shape != (out, n_groups):
        raise FormatError(f"qzeros unpack to {z.shape}, want {(out, n_groups)}")
    if v1:
        z = z + 1
    gi = _contiguous_groups(in_features, group_size) if g_idx is None else _check_groups(g_idx, n_groups, in_features)
    return UnpackedCodes(np.ascontiguousarray(q), np.ascontiguousarray(scales.T), np.ascontiguousarray(z), gi, bits)


def _awq_axis1(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    codes = unpack_bits(words, bits, count, axis=1)
    if bits == 4:  # undo the GEMM kernel's nibble interleave within each word of eight columns
        codes = codes.reshape(codes.shape[0], -1, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(codes.shape[0], -1)
    return codes


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int,
               group_size: int) -> UnpackedCodes:
    """AWQ GEMM (AutoAWQ / GPTQModel) tensors of one layer -> codes."""
    scales = np.asarray(scales)
    n_groups, out = scales.shape
    in_features = qweight.shape[0]
    if bits == 4 and out % 8:
        raise FormatError(f"4-bit AWQ needs a multiple of 8 output columns, got {out}")
    q = _awq_axis1(qweight, bits, out).T
    z = _awq_axis1(qzeros, bits, out).astype(np.int32).T
    if z.shape != (out, n_groups):
        raise FormatError(f"qzeros unpack to {z.shape}, want {(out, n_groups)}")
    gi = _contiguous_groups(in_features, group_size)
    if gi.max() + 1 != n_groups:
        raise FormatError(f"{in_features} input columns in groups of {group_size} make {gi.max() + 1} groups; "
                          f"scales have {n_groups}")
    return UnpackedCodes(np.ascontiguousarray(q), np.ascontiguousarray(scales.T), np.ascontiguousarray(z), gi, bits)


def unpack_compressed(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_zero_point: np.ndarray | None,
                      weight_shape: np.ndarray | tuple[int, int], bits: int, group_size: int,
                      g_idx: np.ndarray | None = None) -> UnpackedCodes:
    """compressed-tensors pack-quantized tensors of one layer -> codes. `weight_zero_point` None: symmetric.
    group_size <= 0: channel (scale [out, 1]) or tensor (scale of one element, repeated per row) strategy."""
    out, in_features = (int(v) for v in np.asarray(weight_shape).reshape(-1))
    scale = np.asarray(weight_scale)
    if scale.size == 1:  # tensor strategy: one scale for the matrix
        scale = np.broadcast_to(scale.reshape(1, 1), (out, 1))
    scale = scale.reshape(out, -1)
    n_groups = scale.shape[1]
    q = unpack_bits(weight_packed, bits, in_features, axis=1)  # already the unsigned code signed + 2^(B-1)
    zeros = None
    if weight_zero_point is not None:
        zp = np.asarray(weight_zero_point)
        if zp.dtype == np.int32 and zp.shape == (packed_length(out, bits), n_groups):
            zeros = unpack_bits(zp, bits, out, axis=0).astype(np.int32)  # stored with the offset: z directly
        elif zp.size in (1, out * n_groups):  # older writers: signed zp, unpacked (int8)
            zeros = np.broadcast_to(zp.astype(np.int32).reshape(-1, 1) if zp.size == 1 else
                                    zp.astype(np.int32).reshape(out, n_groups), (out, n_groups))
            zeros = np.ascontiguousarray(zeros) + (1 << (bits - 1))
        else:
            raise FormatError(f"weight_zero_point is {zp.dtype} {zp.shape}; want int32 "
                              f"{(packed_length(out, bits), n_groups)} (packed) or [{out}, {n_groups}]")
    if g_idx is not None:
        gi = _check_groups(g_idx, n_groups, in_features)
    else:
        gi = _contiguous_groups(in_features, group_size if n_groups > 1 else -1)
        if gi.max() + 1 != n_groups:
            raise FormatError(f"{in_features} input columns in groups of {group_size} make {gi.max() + 1} groups; "
                              f"weight_scale has {n_groups}")
    return UnpackedCodes(np.ascontiguousarray(q), np.ascontiguousarray(scale), zeros, gi, bits)

# -- packing (export): our unpacked codes -> the HF checkpoint layouts -------------------------------------------------
#
# Both formats store b-bit values as one dense little-endian bit stream per row of int32 words: value k of a row
# sits at bits [k*b, k*b + b) of the stream, so 32 values fill exactly b words and a 3-bit value may straddle two:
#
#     b = 4, one word:   bits 0..3 = v0, 4..7 = v1, ..., 28..31 = v7
#     b = 3, 3 words:    w0 = v0..v9 (bits 0..29) + low 2 bits of v10; w1 = high bit of v10, v11..v20, low bit of
#                        v21; w2 = high 2 bits of v21, v22..v31
#
# compressed-tensors packs along `in` (weight_packed [out, ceil(in*b/32)]) and its zero points along `out`
# ([ceil(out*b/32), n_groups]); GPTQ v1 packs qweight along `in` as well but stores it transposed
# ([in*b/32, out]) and qzeros along `out` ([n_groups, out*b/32]). The stored unsigned values are our codes q
# (compressed-tensors' signed value is q - 2^(b-1), it adds the same offset back when packing).

CT_BITS = (2, 3, 4, 5, 6, 8)  # pack-quantized takes 1..8 bits; we quantize to these
GPTQ_BITS = (2, 3, 4, 8)  # what GPTQ v1 loaders read


def pack_bitstream(values: np.ndarray, bits: int) -> np.ndarray:
    """uint [rows, cols] values < 2^bits -> int32 [rows, ceil(cols*bits/32)]: each row one dense bit stream."""
    values = np.asarray(values)
    rows, cols = values.shape
    n_words = -(-cols * bits // 32)
    pad = -cols % 32
    v = np.pad(values.astype(np.uint64), ((0, 0), (0, pad))).reshape(rows, -1, 32)  # [rows, blocks, 32]
    acc = np.zeros((rows, v.shape[1], bits + 1), dtype=np.uint64)  # one spare word for the last straddle
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        shifted = v[:, :, k] << np.uint64(shift)  # < 2^39: fits, the high part spills into the next word
        acc[:, :, word] |= shifted & np.uint64(0xFFFFFFFF)
        acc[:, :, word + 1] |= shifted >> np.uint64(32)
    words = acc[:, :, :bits].reshape(rows, -1)[:, :n_words]
    return words.astype(np.uint32).view(np.int32)


def _integer_zeros(qw: QuantizedWeight, where: str) -> np.ndarray:
    """uint8 [out, n_groups] zero points of a sym or asym (not min form) weight; both formats store integers."""
    if qw.scheme.sym:
        return np.full(qw.scales.shape, 1 << (qw.scheme.bits - 1), dtype=np.uint8)
    z = qw.zeros.astype(np.float32)
    bad = (z != np.rint(z)) | (z < 0) | (z > qw.scheme.qmax)
    if bad.any():
        row, group = (int(i) for i in np.argwhere(bad)[0])
        raise BitsmithError(f"{int(bad.sum())} of {z.size} zero points are not integers in [0, {qw.scheme.qmax}] "
                            f"(first: row {row}, group {group}: {float(z[row, group])})", where=where,
                            fix="HF formats store integer zero points: export with --allow-requantize (nearest: the "
                                "same scheme with rounded zeros), or compile with --sym")
    return z.astype(np.uint8)


def _check_plain(qw: QuantizedWeight, where: str, allowed_bits: tuple[int, ...]) -> None:
    """Refuse what neither HF format can hold exactly: min form, K-quant super-groups, other bit widths."""
    s = qw.scheme
    nearest = f"int{s.bits}-g{s.group_size}-asym" if s.offset else f"int{s.bits}-g{s.group_size}-{'sym' if s.sym else 'asym'}"
    if s.offset or s.super_group:
        what = "the min form (w = s*q + m)" if s.offset else "K-quant super-groups (int8 scale codes x fp16)"
        raise BitsmithError(f"{s.short_name()} uses {what}, which has no exact HF form", where=where,
                            fix=f"export with --allow-requantize (nearest: {nearest} with fp16 scales and integer "
                                "zeros), or --format gguf, which keeps it exactly")
    if s.bits not in allowed_bits:
        raise BitsmithError(f"{s.bits}-bit codes have no exact form here", where=where,
                            fix=f"use bits {allowed_bits}, or export with --allow-requantize (nearest: int8) "
                                "or --format compressed-tensors (2..8 bits)")


def _original_order(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [out, in] in the ORIGINAL column order, g_idx int32 [in]: each original column's group).
    Act-order weights keep codes and groups in permuted order (column c of Wp is original column perm[c]);
    HF formats keep columns in place and say each column's group with g_idx."""
    g = qw.scheme.effective_group_size(qw.in_features)
    groups = (np.arange(qw.in_features) // g).astype(np.int32)
    perm = qw.perm
    if perm is None:
        return qw.q, groups
    q = np.empty_like(qw.q)
    q[:, perm] = qw.q
    g_idx = np.empty_like(groups)
    g_idx[perm] = groups
    return q, g_idx


def pack_compressed_tensors(qw: QuantizedWeight, where: str = "compressed-tensors") -> dict[str, np.ndarray]:
    """The pack-quantized tensors of one Linear (names without the module prefix): weight_packed int32
    [out, ceil(in*b/32)], weight_scale fp16 [out, n_groups], weight_shape int64 [2], and, asymmetric,
    weight_zero_point int32 [ceil(out*b/32), n_groups] (packed along out)."""
    _check_plain(qw, where, CT_BITS)
    s = qw.scheme
    if qw.perm is not None:
        raise BitsmithError("act-order (a column permutation) has no form in compressed-tensors >= 0.12 "
                            "(actorder 'group' and weight_g_idx were removed)", where=where,
                            fix="export with --format gptq, which keeps it as g_idx")
    if s.group_size != -1 and qw.in_features % s.group_size:
        raise BitsmithError(f"{qw.in_features} columns are not a whole number of groups of {s.group_size} "
                            "(our last group is partial; compressed-tensors' group strategy needs whole groups)",
                            where=where, fix="compile with a group size that divides in_features (e.g. g32) "
                                             "or per channel (--group -1)")
    tensors = {"weight_packed": pack_bitstream(qw.q, s.bits),
               "weight_scale": np.ascontiguousarray(qw.scales, dtype=np.float16),
               "weight_shape": np.array([qw.out_features, qw.in_features], dtype=np.int64)}
    if not s.sym:
        tensors["weight_zero_point"] = np.ascontiguousarray(pack_bitstream(_integer_zeros(qw, where).T, s.bits).T)
    return tensors


def compressed_tensors_args(scheme: QuantScheme) -> dict[str, Any]:
    """The `weights` QuantizationArgs of a config_group for `scheme` (int, static, fp16 scales)."""
    args: dict[str, Any] = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.sym, "dynamic": False,
                            "strategy": "channel" if scheme.group_size == -1 else "group",
                            "group_size": None if scheme.group_size == -1 else scheme.group_size}
    return args


def pack_gptq(qw: QuantizedWeight, where: str = "gptq") -> dict[str, np.ndarray]:
    """GPTQ v1 tensors of one Linear: qweight int32 [in*b/32, out], qzeros int32 [n_groups, out*b/32] holding
    zero - 1 (v1), scales fp16 [n_groups, out], g_idx int32 [in] (act-order: the permutation's groups)."""
    _check_plain(qw, where, GPTQ_BITS)
    s = qw.scheme
    for dim, n in (("in", qw.in_features), ("out", qw.out_features)):
        if n * s.bits % 32:
            raise BitsmithError(f"{dim}_features {n} x {s.bits} bits is not a whole number of int32 words",
                                where=where, fix="GPTQ v1 needs in and out multiples of 32 / gcd(32, bits); "
                                                 "use --format compressed-tensors")
    zeros = _integer_zeros(qw, where)
    if (zeros == 0).any():
        raise BitsmithError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1, and loaders add 1 "
                            "back after masking: 0 reads back as 2^bits)", where=where,
                            fix="use --format compressed-tensors, or --allow-requantize")
    q, g_idx = _original_order(qw)
    stored_zeros = (zeros.astype(np.int32) - 1).astype(np.uint8)  # v1: zero - 1
    return {"qweight": np.ascontiguousarray(pack_bitstream(q, s.bits).T),
            "qzeros": pack_bitstream(stored_zeros.T, s.bits),
            "scales": np.ascontiguousarray(qw.scales.T, dtype=np.float16),
            "g_idx": g_idx}

"""Pure-numpy codecs of pre-quantized HF checkpoint layouts (GPTQ, AWQ GEMM, compressed-tensors pack-quantized).

The importer (frontends/hf_quantized.py) uses the `unpack_*` functions; the exporter (tools/export_hf.py) writes
the same layouts with the `pack_*` inverses, so import(export(A)) round-trips through one definition of each layout.

Every layout below stores B-bit codes as a dense little-endian bit stream in int32 words along one axis:
code k of the axis occupies global bits [k*B, (k+1)*B), word w holds global bits [32w, 32w+32), LSB first.
For B in (2, 4, 8) a code never straddles a word; for B = 3 (GPTQ, compressed-tensors >= 0.10) every 32 codes
fill exactly 3 words and codes 10 and 21 straddle:

    word 0: c0 c1 ... c9 [c10 lo 2 bits]      word 1: [c10 hi 1] c11 ... c20 [c21 lo 1]      word 2: [c21 hi 2] c22 ... c31
    bit:    0  3     27  30                           0          1       28  31                      0          2        29

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

import numpy as np

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
        s = self.scales.astype(np.float32)[:, self.g_idx]
        z = self.zero_points().astype(np.float32)[:, self.g_idx]
        return (self.q.astype(np.float32) - z) * s


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

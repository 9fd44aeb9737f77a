"""Our group-quantized weights as onnxruntime's MatMulNBits operands: pure numpy, exact where the codes allow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.errors import BitsmithError

# MatMulNBits (com.microsoft, onnxruntime 1.32 CPU) computes Y = A @ W^T with
#   W[n, k] = (code[n, k] - zp[n, b]) * scale[n, b],   b = k // block_size,   zp = 2^(bits-1) when absent
# for bits in {2, 4, 8} (3 is refused at session start) and block_size a power of two >= 16 (one block larger
# than K is fine: a per-channel group becomes one padded block).
#
# B, uint8 [N, n_blocks, blob], blob = block_size * bits / 8; codes low bits first within a byte:
#
#     4 bits, block 32 (blob 16):  byte j of block b = code[k0 + 2j] | code[k0 + 2j + 1] << 4,  k0 = b * 32
#     2 bits:                      byte j = c[4j] | c[4j+1] << 2 | c[4j+2] << 4 | c[4j+3] << 6
#     8 bits:                      byte j = c[j]
#
# the last block is padded with code 0 when block_size does not divide K (onnxruntime reads only K columns).
#
# Only its no-zero-point kernels are fast (measured, AMD EPYC, 576x1536, M=1): 4-bit 0.07 ms at accuracy level 0
# and 0.03 at 4; float zero points 6-9 ms at either level (a dequantizing fallback); 8-bit and 2-bit 7-16 ms at
# level 0 and 0.04 / 0.5 ms at level 4. So every weight is written as sums of sym MatMulNBits parts plus, for
# forms with a zero point or a min, a per-group offset term (exact algebra, one float rounding):
#
#     w = s*q + m  (sym: m = -2^(b-1) s; asym: m = -z s; min: m as stored)
#       = sum over parts (q_p - 2^(t_p - 1)) * s_p  +  m'      y = sum_p MatMulNBits_p(x) + groupsum(x) @ m'^T
#
#   one t-bit part with codes q:        m' = m + 2^(t-1) s      (0 for sym, whose codes are shifted instead;
#                                        widened codes are centred first: q + c, m - c s, c = 2^(t-1) - 2^(b-1))
#   8-bit codes at accuracy level 0 as two 4-bit parts, hi = q >> 4 (scale 16 s), lo = q & 15 (scale s):
#                                        m' = m + 136 s          (16 (hi - 8) + (lo - 8) = q - 136)
# Widening is exact: 3-bit codes go to 4, 5/6-bit to 8 (at level 0: 2-bit to 4 as well, for the fast kernel).
NBITS = (2, 4, 8)


@dataclass
class NBitsPart:
    """One MatMulNBits: codes packed for its `bits` (no zero points: 2^(bits-1)), scales float32 [N * n_blocks]."""

    bits: int
    blob: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray


@dataclass
class NBitsWeight:
    """MatMulNBits operands of one weight [N, K] (parts summed, plus the offset term) and how they were reached."""

    block_size: int
    group_size: int  # columns per offset group (K when per channel)
    n: int
    k: int
    parts: list[NBitsPart]
    offsets: np.ndarray | None  # float32 [N, n_groups]: m' of the group-sum term, None when zero
    note: str  # how the codes were mapped ("" when as stored)
    max_abs_error: float  # of the weight MatMulNBits dequantizes vs ours (float rounding of m')

    @property
    def target(self) -> str:
        bits = "+".join(str(p.bits) for p in self.parts)
        return f"MatMulNBits {bits}-bit b{self.block_size}" + (" +offsets" if self.offsets is not None else "")


class NotMappable(BitsmithError):
    """A weight with no MatMulNBits form; `nearest` names the schemes that have one."""

    def __init__(self, message: str, nearest: str, where: str) -> None:
        super().__init__(message, where=where, fix=f"requantize to {nearest} (bitsmith compile --scheme ...), or pass "
                                                   "--allow-requantize to store this weight dequantized (float MatMul)")
        self.nearest = nearest


def target_bits(bits: int, accuracy_level: int) -> int:
    """The MatMulNBits width holding `bits`-bit codes: 2, 4 or 8 (at level 0, 2 -> 4 for onnxruntime's fast kernel)."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise NotMappable(f"{bits}-bit codes", nearest="int4 or int8", where="onnx export (MatMulNBits)")
    if bits <= 2:
        return 2 if accuracy_level else 4
    return 4 if bits <= 4 else 8


def block_for(group_size: int, k: int) -> int:
    """MatMulNBits block_size for our group: the group itself, or per-channel: the next power of two >= max(K, 16)."""
    size = k if group_size == -1 else group_size
    if group_size == -1:
        return max(16, 1 << (size - 1).bit_length())
    if size < 16 or size & (size - 1):
        raise BitsmithError(f"group size {size} has no MatMulNBits block size", where="onnx export (MatMulNBits)",
                            fix="use groups of 16, 32, 64 or 128, or per-channel")
    return size


def pack_blocks(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """uint8 codes [N, K] -> uint8 [N, n_blocks, block_size * bits / 8], low bits first, zero-padded to whole blocks."""
    n, k = codes.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.uint8)
    padded[:, :k] = codes
    per = 8 // bits
    lanes = padded.reshape(n, n_blocks, block_size // per, per)
    out = np.zeros(lanes.shape[:3], dtype=np.uint8)
    for j in range(per):
        out |= (lanes[..., j] << np.uint8(j * bits)).astype(np.uint8)
    return out


def to_nbits(codes: np.ndarray, bits: int, group_size: int, scales: np.ndarray, zeros: np.ndarray | None = None,
             offsets: np.ndarray | None = None, accuracy_level: int = 0, where: str = "onnx export") -> NBitsWeight:
    """Our weight (codes [N, K], float32 per-group `scales` [N, G]; sym when both `zeros` (fp16 zero point z:
    w = (q - z) * s) and `offsets` (min form m: w = s * q + m) are None) as MatMulNBits operands."""
    n, k = codes.shape
    sym = zeros is None and offsets is None
    t = target_bits(bits, accuracy_level)
    block = block_for(group_size, k)
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    if scales.shape != (n, n_groups):
        raise BitsmithError(f"scales {scales.shape} do not match {n} rows of {n_groups} groups", where=where,
                            fix="re-export from an artifact written by this bitsmith")
    s = scales.astype(np.float32)
    q = codes.astype(np.int32)
    notes = [f"{bits}-bit codes widened to {t}-bit"] if t != bits else []
    split = t == 8 and accuracy_level == 0
    if split:
        notes.append("8-bit codes as two 4-bit MatMulNBits (q >> 4 with scale 16 s, q & 15 with s): onnxruntime's "
                     "8-bit CPU kernel is fast only at accuracy level 4")
    if sym and not split:
        shifted = q + (1 << (t - 1)) - (1 << (bits - 1))
        return NBitsWeight(block, g, n, k, [NBitsPart(t, pack_blocks(shifted.astype(np.uint8), t, block),
                                                      np.ascontiguousarray(s.reshape(-1)))], None, "; ".join(notes), 0.0)
    if zeros is not None:
        m = -zeros.astype(np.float32) * s
    elif offsets is not None:
        m = offsets.astype(np.float32)
    else:
        m = np.float32(-(1 << (bits - 1))) * s
    # widened codes are centred in the target range (q + c), so the parts and m' cancel as little as they can
    c = (1 << (t - 1)) - (1 << (bits - 1))
    m_ours = m
    q, m = q + c, m - np.float32(c) * s
    if split:
        hi, lo = (q >> 4).astype(np.uint8), (q & 15).astype(np.uint8)
        parts = [NBitsPart(4, pack_blocks(hi, 4, block), np.ascontiguousarray((np.float32(16) * s).reshape(-1))),
                 NBitsPart(4, pack_blocks(lo, 4, block), np.ascontiguousarray(s.reshape(-1)))]
        m_prime = m + np.float32(136) * s
    else:
        parts = [NBitsPart(t, pack_blocks(q.astype(np.uint8), t, block), np.ascontiguousarray(s.reshape(-1)))]
        m_prime = m + np.float32(1 << (t - 1)) * s
    group = np.arange(k) // g
    if zeros is not None:
        ours = (codes.astype(np.float32) - zeros.astype(np.float32)[:, group]) * s[:, group]
    else:
        ours = s[:, group] * codes.astype(np.float32) + m_ours[:, group]
    if not sym:
        notes.append("zero point / min as a per-group offset term (group sums of x)")
    out = NBitsWeight(block, g, n, k, parts, np.ascontiguousarray(m_prime.astype(np.float32)), "; ".join(notes), 0.0)
    out.max_abs_error = float(np.max(np.abs(dequantize_nbits(out) - ours))) if ours.size else 0.0
    return out


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """float32 [N, K] as the MatMulNBits parts and the offset term define it (for tests and the export report)."""
    group = np.arange(w.k) // w.block_size
    total = np.zeros((w.n, w.k), dtype=np.float32)
    for p in w.parts:
        per = 8 // p.bits
        mask = np.uint8((1 << p.bits) - 1)
        lanes = np.stack([(p.blob >> np.uint8(j * p.bits)) & mask for j in range(per)], axis=-1)
        q = lanes.reshape(w.n, -1)[:, :w.k].astype(np.float32)
        s = p.scales.reshape(w.n, p.blob.shape[1])[:, group]
        total += (q - np.float32(1 << (p.bits - 1))) * s
    if w.offsets is not None:
        total += w.offsets[:, np.arange(w.k) // w.group_size]
    return total

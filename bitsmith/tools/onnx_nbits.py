"""Our group-quantized weights as onnxruntime's MatMulNBits operands: pure numpy, exact where the codes allow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.errors import BitsmithError

# MatMulNBits (com.microsoft, onnxruntime 1.32 CPU) computes Y = A @ W^T with
#   W[n, k] = (code[n, k] - zp[n, b]) * scale[n, b],   b = k // block_size,   zp = 2^(bits-1) when absent
# and takes bits in {2, 4, 8} only (3 is refused at session start), block_size a power of two >= 16
# (one block larger than K is fine: per-channel groups become one padded block), float zero points for 2 and 4
# bits but not for 8 ("does not support 8-bit weights with floating-point zero points", checked here).
#
# B, uint8 [N, n_blocks, blob], blob = block_size * bits / 8; codes low bits first within a byte:
#
#     4 bits, block 32 (blob 16):  byte j of block b = code[k0 + 2j] | code[k0 + 2j + 1] << 4,  k0 = b * 32
#     2 bits:                      byte j = c[4j] | c[4j+1] << 2 | c[4j+2] << 4 | c[4j+3] << 6
#     8 bits:                      byte j = c[j]
#
# the last block is padded with code 0 when block_size does not divide K (onnxruntime reads only K columns).
#
# Widening is exact: a b-bit symmetric code q (zero 2^(b-1)) is the code q + 2^(t-1) - 2^(b-1) of a t-bit one
# with the same scale, and an asymmetric code keeps its value under a float zero point; so 3-bit goes to 4 and
# 5/6-bit symmetric go to 8. What no MatMulNBits form holds exactly: 8-bit (or 5/6-bit widened to 8) with a
# fractional zero point or a min offset.
NBITS = (2, 4, 8)
FLOAT_ZP_BITS = (2, 4)


@dataclass
class NBitsWeight:
    """MatMulNBits operands of one weight [N, K] and how they were reached from our codes."""

    bits: int
    block_size: int
    n: int
    k: int
    blob: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # float32 [N * n_blocks], None: the default 2^(bits-1)
    note: str  # how the codes were mapped ("" when as stored)
    max_abs_error: float  # of the weight MatMulNBits dequantizes vs ours (float rounding of a converted zero point)

    @property
    def target(self) -> str:
        zp = "" if self.zero_points is None else " fzp"
        return f"MatMulNBits {self.bits}-bit b{self.block_size}{zp}"


class NotMappable(BitsmithError):
    """A scheme with no exact MatMulNBits form; `nearest` names the schemes that have one."""

    def __init__(self, message: str, nearest: str, where: str) -> None:
        super().__init__(message, where=where, fix=f"requantize to {nearest} (bitsmith compile --scheme ...), or pass "
                                                   "--allow-requantize to store this weight dequantized (float MatMul)")
        self.nearest = nearest


def target_bits(bits: int, sym: bool, offset: bool, where: str) -> int:
    """The MatMulNBits bit width that holds `bits`-bit codes exactly, or NotMappable naming the nearest scheme."""
    widened = bits if bits in NBITS else 4 if bits < 4 else 8
    if widened == 8 and not sym:
        form = "min offset" if offset else "fractional fp16 zero point"
        raise NotMappable(f"int{bits} with a {form} has no exact MatMulNBits form (onnxruntime's CPU kernel takes "
                          "8-bit weights with integer zero points only)", nearest=f"int{bits}-sym or int4-asym",
                          where=where)
    return widened


def block_for(group_size: int, k: int) -> int:
    """MatMulNBits block_size for our group: the group itself, or per-channel: the next power of two >= max(K, 16)."""
    size = k if group_size == -1 else group_size
    if group_size == -1 or size < 16:
        return max(16, 1 << (size - 1).bit_length())
    if size & (size - 1):
        raise BitsmithError(f"group size {size} is not a power of two", where="onnx export (MatMulNBits)",
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
             offsets: np.ndarray | None = None, where: str = "onnx export") -> NBitsWeight:
    """Our weight (codes [N, K], float32 per-group `scales` [N, G]; sym when both `zeros` (fp16 zero point z:
    w = (q - z) * s) and `offsets` (min form m: w = s * q + m) are None) as MatMulNBits operands."""
    n, k = codes.shape
    sym = zeros is None and offsets is None
    t = target_bits(bits, sym, offsets is not None, where)
    block = block_for(group_size, k)
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    if scales.shape != (n, n_groups):
        raise BitsmithError(f"scales {scales.shape} do not match {n} rows of {n_groups} groups", where=where,
                            fix="re-export from an artifact written by this bitsmith")
    # groups smaller than 16 columns (K-quants' 16) still map one group per block: block == group when g >= 16
    if block != g and group_size != -1:
        raise BitsmithError(f"group size {g} has no MatMulNBits block size", where=where,
                            fix="use groups of 16, 32, 64 or 128")
    q = codes.astype(np.int32)
    note = ""
    if t != bits:
        note = f"{bits}-bit codes widened to {t}-bit"
        if sym:
            q = q + (1 << (t - 1)) - (1 << (bits - 1))
    s = scales.astype(np.float32)
    group = np.arange(k) // g
    zp, err = None, 0.0
    if zeros is not None:
        zp = zeros.astype(np.float32)
    elif offsets is not None:
        # min form w = s*q + m as (q - zp)*s with zp = -m/s: codes unchanged, zp rounded to float32
        m = offsets.astype(np.float32)
        if np.any((s == 0) & (m != 0)):
            raise NotMappable("a group with scale 0 and a nonzero min has no zero-point form", nearest="int4-asym",
                              where=where)
        zp = np.divide(-m, s, out=np.zeros_like(m), where=s != 0)
        ours = s[:, group] * codes.astype(np.float32) + m[:, group]
        theirs = (codes.astype(np.float32) - zp[:, group]) * s[:, group]
        err = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        note = (note + "; " if note else "") + "min offset as float zero point -m/s"
    return NBitsWeight(bits=t, block_size=block, n=n, k=k, blob=pack_blocks(q.astype(np.uint8), t, block),
                       scales=np.ascontiguousarray(s.reshape(-1)), note=note, max_abs_error=err,
                       zero_points=None if zp is None else np.ascontiguousarray(zp.reshape(-1)))


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """float32 [N, K] as MatMulNBits defines it (for tests and the export report)."""
    per = 8 // w.bits
    mask = np.uint8((1 << w.bits) - 1)
    lanes = np.stack([(w.blob >> np.uint8(j * w.bits)) & mask for j in range(per)], axis=-1)
    q = lanes.reshape(w.n, -1)[:, :w.k].astype(np.float32)
    n_blocks = w.blob.shape[1]
    group = np.arange(w.k) // w.block_size
    s = w.scales.reshape(w.n, n_blocks)[:, group]
    z = np.float32(1 << (w.bits - 1)) if w.zero_points is None else w.zero_points.reshape(w.n, n_blocks)[:, group]
    return (q - z) * s

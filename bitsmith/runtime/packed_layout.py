"""The packed-weight layout of artifacts: b-bit codes in uint32 words, lane-interleaved and gather-free.

The runtime reads it (`unpack`, and runtime/interleave.py repacks from it); passes/quant/packing.py
writes it (`pack`).

Each output row is packed on its own into a row of uint32 words. A "lane unit" is the smallest
whole number of words holding a whole number of values: U = 1 word of S = 32/b values for
b in {2, 4, 8}, and U = b words of S = 32 values for b in {3, 5, 6} (a 32*b-bit stream, so b bits per
value exactly; for b = 6 this is twice the smallest unit, kept so that every odd width reads alike).
The row's K axis is cut into blocks of 16 lanes x S slots = 16*S values
(b=2: 256, b=3/5/6: 512, b=4: 128, b=8: 64):

    element k = kb*16*S + j*16 + l        (block kb, slot j in [0, S), lane l in [0, 16))
    word      = kb*16*U + p*16 + l        (unit word p in [0, U))
    lane l's U words, read as one little-endian bit stream, hold slot j at bits [j*b, j*b + b)

    b = 4 (S = 8, U = 1), one block, 16 words:          b = 3 (S = 32, U = 3), one block, 48 words:
              word: w0    w1    ...  w15                          lane: 0     1   ...  15
    bits  0..3  (j=0): k0    k1    ...  k15               p=0 words w0..w15:  j=0..9, low 2 bits of j=10
    bits  4..7  (j=1): k16   k17   ...  k31               p=1 words w16..w31: high bit of j=10, j=11..20,
      ...                                                                     low bit of j=21
    bits 28..31 (j=7): k112  k113  ...  k127              p=2 words w32..w47: high 2 bits of j=21, j=22..31
                                                          lane l, slot j holds k = j*16 + l

So 16 consecutive words at a fixed bit position hold 16 consecutive k: a SIMD kernel shifts and
masks whole vectors and multiplies them by 16 contiguous activations, with no gathers; in full
blocks a group (16, 32, 64 or 128 values, a multiple of 16) covers whole slots, so its scale is a
broadcast (in the tail too whenever L divides the group size, e.g. 576 = 4*128 + 64 at b=4: L=8).
For b = 4 this is exactly "uint32 word kb*16 + l holds nibble j of k = kb*128 + j*16 + l".

Tail: when in_features is not a multiple of 16*S, the remaining r values form one last block
with L = ceil(r / S) lanes instead of 16 (element k = base + j*L + l, word base_w + p*L + l),
padded with zero codes up to L*S values. A row therefore costs at most one lane unit of padding
(< 32*b bits) beyond bits * in_features, and for in_features a multiple of 32 none at all.
"""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError

PACK_BITS = (2, 3, 4, 5, 6, 8)
LANES = 16


def lane_unit(bits: int) -> tuple[int, int]:
    """(U words, S values) of one lane unit: U*32 == S*bits."""
    if bits not in PACK_BITS:
        raise BitsmithError(f"cannot pack {bits!r}-bit codes", where="packing", fix=f"use one of {PACK_BITS}")
    if 32 % bits == 0:
        return 1, 32 // bits
    return bits, 32  # 3, 5, 6 bits: 32 values in a stream of b words (values may straddle two words)


def split_row(in_features: int, bits: int) -> tuple[int, int, int, int, int]:
    """(U, S, full blocks, tail values r, tail lanes L) for one row of in_features values."""
    units, slots = lane_unit(bits)
    full, rest = divmod(in_features, LANES * slots)
    return units, slots, full, rest, -(-rest // slots)


def packed_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    """Shape (out, words per row) of the uint32 array `pack` returns."""
    units, _, full, _, tail_lanes = split_row(in_features, bits)
    return out_features, full * LANES * units + tail_lanes * units


def packed_bytes(out_features: int, in_features: int, bits: int) -> int:
    """Bytes of packed codes (scales and zeros not included)."""
    rows, words = packed_shape(out_features, in_features, bits)
    return rows * words * 4


def unpack_lanes(words: np.ndarray, bits: int, slots: int) -> np.ndarray:
    """uint32 [..., U, L] -> uint8 [..., S, L]; the inverse of passes/quant/packing.py's `pack_lanes`."""
    w64 = words.astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty(words.shape[:-2] + (slots, words.shape[-1]), dtype=np.uint8)
    for j in range(slots):
        p, off = divmod(j * bits, 32)
        chunk = w64[..., p, :]
        if off + bits > 32:
            chunk = chunk | (w64[..., p + 1, :] << np.uint64(32))
        out[..., j, :] = (chunk >> np.uint64(off)) & mask
    return out


def unpack(words: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """uint32 [out, words] -> uint8 codes [out, in_features]; the inverse of `pack`."""
    words = np.asarray(words)
    units, slots, full, rest, tail_lanes = split_row(in_features, bits)
    expected = packed_shape(words.shape[0] if words.ndim == 2 else 0, in_features, bits)
    if words.ndim != 2 or words.dtype != np.uint32 or words.shape != expected:
        raise BitsmithError(f"packed words are {words.dtype} {words.shape}, expected uint32 {expected} "
                            f"for {in_features} {bits}-bit values per row", where="unpacking",
                            fix="pass the bits and in_features the words were packed with")
    out_f = words.shape[0]
    n_body = full * LANES * units
    body = unpack_lanes(words[:, :n_body].reshape(out_f, full, units, LANES), bits, slots)
    parts = [body.reshape(out_f, -1)]
    if rest:
        tail = unpack_lanes(words[:, n_body:].reshape(out_f, units, tail_lanes), bits, slots)
        parts.append(tail.reshape(out_f, -1)[:, :rest])
    return np.concatenate(parts, axis=1)

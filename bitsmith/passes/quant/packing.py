"""Bit-exact packing of b-bit codes into uint32 words: the writer of the layout that
bitsmith/runtime/packed_layout.py describes and reads (the reader)."""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.packed_layout import LANES, split_row


def pack_lanes(v: np.ndarray, bits: int, units: int) -> np.ndarray:
    """uint8 [..., S, L] (slot, lane) -> uint32 [..., U, L]: each lane's slots as one bit stream."""
    if 32 % bits == 0:  # 1/2/4/8 bits never straddle a word: stay in uint32 (half the bytes of the general path)
        words32 = np.zeros(v.shape[:-2] + (units, v.shape[-1]), dtype=np.uint32)
        for j in range(v.shape[-2]):
            p, off = divmod(j * bits, 32)
            words32[..., p, :] |= v[..., j, :].astype(np.uint32) << np.uint32(off)
        return words32
    words = np.zeros(v.shape[:-2] + (units, v.shape[-1]), dtype=np.uint64)
    for j in range(v.shape[-2]):
        p, off = divmod(j * bits, 32)
        shifted = v[..., j, :].astype(np.uint64) << np.uint64(off)
        words[..., p, :] |= shifted & np.uint64(0xFFFFFFFF)
        if off + bits > 32:  # 3, 5, 6 bits: this value straddles words p and p + 1
            words[..., p + 1, :] |= shifted >> np.uint64(32)
    return words.astype(np.uint32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [out, in] (each < 2^bits) -> uint32 [out, words] in the layout of packed_layout.py."""
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype != np.uint8:
        raise BitsmithError(f"pack expects uint8 [out, in], got {q.dtype} {q.shape}", where="packing",
                            fix="pass QuantizedWeight.q")
    units, slots, full, rest, tail_lanes = split_row(q.shape[1], bits)
    if q.size and int(q.max()) >> bits:
        raise BitsmithError(f"code {int(q.max())} does not fit in {bits} bits", where="packing",
                            fix=f"codes must be in [0, {1 << bits})")
    out_f = q.shape[0]
    n_full = full * LANES * slots
    # full blocks: k = kb*16*S + j*16 + l  ->  [out, kb, j (slot), l (lane)]
    body = pack_lanes(q[:, :n_full].reshape(out_f, full, slots, LANES), bits, units)
    parts = [body.reshape(out_f, -1)]
    if rest:
        tail = np.zeros((out_f, tail_lanes * slots), dtype=np.uint8)
        tail[:, :rest] = q[:, n_full:]
        # tail block: k = base + j*L + l  ->  [out, j, l]
        parts.append(pack_lanes(tail.reshape(out_f, slots, tail_lanes), bits, units).reshape(out_f, -1))
    return np.concatenate(parts, axis=1)



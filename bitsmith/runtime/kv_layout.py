"""How a layer's paged KV pool stores each KV dtype: array shapes, element types and scale arrays (numpy only)."""

from __future__ import annotations

import numpy as np

# One layer's pool, for every dtype: [num_blocks, 2 (keys, values), block_size, kv_heads, ...]. A (token, kv
# head) row of head_dim elements is stored as:
#
#   float32 / float16   pool[b, kv, slot, h, d]            the value itself
#   int8                pool[b, kv, slot, h, d]            code c in [-127, 127]      x = c * s
#                       scales[b, kv, slot, h]             s = max|x| / 127  (fp32)
#   int4                pool[b, kv, slot, h, d // 2]       uint8, two codes per byte  x = m + c * s
#                       scales[b, kv, slot, h, 0 | 1]      s = (max x - min x) / 15, m = min x  (fp32)
#
#   int4 row of head_dim = 8, codes c0..c7 in [0, 15] (asymmetric: a per-row minimum, 16 levels):
#
#       byte      0          1          2          3
#           +----+----+ +----+----+ +----+----+ +----+----+
#           | c1 | c0 | | c3 | c2 | | c5 | c4 | | c7 | c6 |     element 2j in the low nibble of byte j,
#           +----+----+ +----+----+ +----+----+ +----+----+     element 2j + 1 in the high nibble
#           7  4 3   0
#
# Why asymmetric int4: on TinyStories-656K, with and without a Hadamard on the keys, a (scale, min) pair per
# row halves the KL divergence of a symmetric [-7, 7] code (0.022 vs 0.039 for int4 keys and values, 8k tokens).
# What it costs (KLD vs the 16-bit cache, fp32 weights, reference executor): SmolLM2-135M, 8184 tokens of
# wiki.test.raw at ctx 1024: int8 0.00066, int4 0.101; with --rotate hadamard int8 0.00019, int4 0.045.
# Keys carry most of it (2 windows, rotated: int4 keys + int8 values 0.041, int8 keys + int4 values 0.0066).

QUANTIZED_KV = ("int8", "int4")
INT4_LEVELS = 15  # int4 codes 0..15: x = min + code * (max - min) / 15


def pool_storage(kv_dtype: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], str, tuple[int, ...] | None]:
    """(pool shape, pool element dtype, scales shape or None) of a pool of logical `shape`
    [blocks, 2, block_size, kv_heads, head_dim] holding `kv_dtype`; scales are float32."""
    if kv_dtype == "int4":
        if shape[-1] % 2:
            raise ValueError(f"int4 KV packs two codes a byte: head_dim {shape[-1]} must be even")
        return (*shape[:-1], shape[-1] // 2), "uint8", (*shape[:-1], 2)
    if kv_dtype == "int8":
        return tuple(shape), "int8", tuple(shape[:-1])
    if kv_dtype in ("float32", "float16"):
        return tuple(shape), kv_dtype, None
    raise ValueError(f"unknown KV dtype {kv_dtype!r}")


def pool_bytes(kv_dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a pool of logical `shape` holding `kv_dtype`, its scales included."""
    storage, dtype, scales = pool_storage(kv_dtype, shape)
    total = int(np.prod(storage, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total + (4 * int(np.prod(scales, dtype=np.int64)) if scales else 0)


def token_bytes(kv_dtype: str, kv_heads: int, head_dim: int) -> int:
    """Bytes one cached position takes in one layer: keys + values of every kv head, scales included."""
    return pool_bytes(kv_dtype, (1, 2, 1, kv_heads, head_dim))


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., d] in [0, 15] -> bytes [..., d // 2]: element 2j low nibble, 2j + 1 high."""
    codes = np.asarray(codes, dtype=np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """bytes [..., d // 2] -> uint8 codes [..., d] (pack_int4's inverse)."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out


def int4_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [..., d] -> (codes uint8 [..., d] in [0, 15], scales float32 [..., 2] = (step, min)).

    step = (max - min) / 15 (1 when that is 0), code = round-half-even((x - min) / step) clipped to [0, 15];
    the kernels compute the same in float32."""
    x = np.asarray(x, dtype=np.float32)
    low = x.min(axis=-1, keepdims=True)
    step = (x.max(axis=-1, keepdims=True) - low) / np.float32(INT4_LEVELS)
    step = np.where(step > 0, step, np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint((x - low) / step), 0, INT4_LEVELS).astype(np.uint8)
    return codes, np.concatenate([step, low], axis=-1)


def int4_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes [..., d], scales [..., 2] (step, min) -> float32 min + code * step (the kernels' order)."""
    return scales[..., 1:2] + codes.astype(np.float32) * scales[..., 0:1]

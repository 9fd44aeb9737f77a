"""LLM-level IR ops: embedding, linear, rmsnorm, layernorm, rope and attention over an explicit KV cache."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.ops.registry import COMPUTE_DTYPE, as_float, check, register
from bitsmith.runtime.kv_layout import int4_dequantize, int4_quantize

# ---------------------------------------------------------------- embedding / linear


def _embedding_infer(in_types, attrs, weights):
    table, ids = in_types
    check(table.rank == 2, f"embedding table must be 2-D, got {table.shape}")
    check(ids.dtype in ("int64", "int32"), f"embedding ids must be integers, got {ids.dtype}")
    return [TensorType(ids.shape + (table.shape[1],), COMPUTE_DTYPE)]


def _embedding_ref(xs, attrs, ctx):
    table, ids = xs
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise IndexError(f"token id out of range [0, {table.shape[0]})")
    return [as_float(table[ids])]


register("embedding", (2, 2), _embedding_infer, _embedding_ref)


def _linear_infer(in_types, attrs, weights):
    x, w = in_types[:2]
    check(w.rank == 2, f"linear weight must be 2-D [out, in], got {w.shape}")
    check(x.shape[-1] == w.shape[1], f"linear input has {x.shape[-1]} features, weight expects {w.shape[1]}")
    if len(in_types) == 3:
        check(in_types[2].shape == (w.shape[0],), f"linear bias shape {in_types[2].shape} != ({w.shape[0]},)")
    return [TensorType(x.shape[:-1] + (w.shape[0],), COMPUTE_DTYPE)]


def _linear_ref(xs, attrs, ctx):
    y = as_float(xs[0]) @ as_float(xs[1]).T  # x[..., in] @ W[out, in]^T
    if len(xs) == 3:
        y = y + as_float(xs[2])
    return [y]


register("linear", (2, 3), _linear_infer, _linear_ref)

# ---------------------------------------------------------------- norms


def _norm_infer(in_types, attrs, weights):
    x = in_types[0]
    for p in in_types[1:]:
        check(p.shape == (x.shape[-1],), f"norm parameter {p.shape} does not match features {x.shape[-1]}")
    return [TensorType(x.shape, COMPUTE_DTYPE)]


def _rmsnorm_ref(xs, attrs, ctx):
    x = as_float(xs[0])
    var = np.mean(x * x, axis=-1, keepdims=True)
    y = x / np.sqrt(var + np.float32(attrs["eps"]))
    return [y * as_float(xs[1]) if len(xs) > 1 else y]


def _layernorm_ref(xs, attrs, ctx):
    x = as_float(xs[0])
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(attrs["eps"]))
    if len(xs) > 1:
        y = y * as_float(xs[1])
    if len(xs) > 2:
        y = y + as_float(xs[2])
    return [y]


register("rmsnorm", (1, 2), _norm_infer, _rmsnorm_ref)
register("layernorm", (1, 3), _norm_infer, _layernorm_ref)

# ---------------------------------------------------------------- rope


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2], float32 as transformers computes them."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim)))
    inv = inv.astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rope_infer(in_types, attrs, weights):
    x, pos = in_types
    check(x.rank == 3, f"rope expects x[seq, heads, head_dim], got {x.shape}")
    check(pos.rank == 1 and pos.dtype in ("int64", "int32"), "rope positions must be int[seq]")
    check(attrs.get("style", "half") in ("half", "interleaved"), f"unknown rope style {attrs.get('style')}")
    rot = attrs.get("rotary_dim", x.shape[2])
    check(isinstance(x.shape[2], int) and rot % 2 == 0 and rot <= x.shape[2], f"bad rotary_dim {rot}")
    return [TensorType(x.shape, COMPUTE_DTYPE)]


def _rope_ref(xs, attrs, ctx):
    x, pos = as_float(xs[0]), xs[1]
    rot = attrs.get("rotary_dim", x.shape[2])
    inv = rope_inv_freq(rot, attrs["theta"], attrs.get("scaling"))
    freqs = pos.astype(np.float32)[:, None] * inv[None, :]  # [seq, rot/2]
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]  # [seq, 1, rot/2]
    xr, rest = x[..., :rot], x[..., rot:]
    if attrs.get("style", "half") == "half":
        # pairs (i, i + rot/2): HF rotate_half layout
        a, b = xr[..., : rot // 2], xr[..., rot // 2:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        # pairs (2i, 2i+1): llama2.c / GGUF interleaved layout
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(xr.shape)
    return [np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out]


register("rope", (2, 2), _rope_infer, _rope_ref)

# ---------------------------------------------------------------- attention
# KV cache layout (one tensor for the whole model, threaded through every attention node):
#   cache[layer, 0, slot, kv_head, :] = key of the token at position `slot`
#   cache[layer, 1, slot, kv_head, :] = value
# shape [layers, 2, ctx, kv_heads, head_dim]; a sequence's token at position p lives in slot p.
KV_STORAGE = ("float32", "float16", "int8", "int4")  # what `kv_dtype` may say (runtime/kv_layout.py)


def _attention_infer(in_types, attrs, weights):
    q, k, v, pos, cache = in_types
    check(q.rank == 3 and k.rank == 3 and v.rank == 3, "attention expects q/k/v as [seq, heads, head_dim]")
    check(k.shape == v.shape, f"attention k {k.shape} and v {v.shape} differ")
    check(q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2], f"attention q {q.shape} vs k {k.shape}")
    check(isinstance(q.shape[1], int) and q.shape[1] % k.shape[1] == 0, "query heads must be a multiple of kv heads")
    check(cache.rank == 5 and cache.shape[1] == 2, f"kv cache must be [layers, 2, ctx, kv_heads, head_dim], got {cache.shape}")
    check(cache.shape[3:] == k.shape[1:], f"kv cache {cache.shape} does not match k {k.shape}")
    check(isinstance(cache.shape[0], int) and 0 <= attrs["layer"] < cache.shape[0], f"layer {attrs['layer']} out of range")
    check(attrs.get("kv_dtype", "float32") in KV_STORAGE, f"unknown kv_dtype {attrs.get('kv_dtype')}")
    check(attrs.get("kv_dtype") != "int4" or k.shape[2] % 2 == 0, f"int4 KV needs an even head_dim, got {k.shape[2]}")
    check(attrs.get("softcap") is None or attrs["softcap"] > 0, f"softcap {attrs.get('softcap')} must be > 0 (or absent)")
    return [TensorType(q.shape, COMPUTE_DTYPE), cache]


def kv_storage_round(x: np.ndarray, kv_dtype: str) -> np.ndarray:
    """x [seq, kv_heads, head_dim] as a `kv_dtype` cache stores it, back in float32.

    int8: symmetric, one scale per (token, kv head): s = max|x| / 127 (1 for an all-zero row),
    code = round-half-even(x / s) clipped to [-127, 127]; the kernels do the same.
    int4: asymmetric, a step and a minimum per (token, kv head) (runtime/kv_layout.py `int4_quantize`).
    """
    if kv_dtype == "float32":
        return x
    if kv_dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if kv_dtype == "int8":
        scale = np.max(np.abs(x), axis=-1, keepdims=True) / np.float32(127)
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        return np.clip(np.rint(x / scale), -127, 127).astype(np.float32) * scale
    if kv_dtype == "int4":
        return int4_dequantize(*int4_quantize(x))
    raise ValueError(f"unknown kv_dtype {kv_dtype!r}")


def _attention_ref(xs, attrs, ctx):
    q, k, v, pos, cache = as_float(xs[0]), as_float(xs[1]), as_float(xs[2]), xs[3], xs[4]
    layer = attrs["layer"]
    if pos.size and pos.max() >= cache.shape[2]:
        raise IndexError(f"position {int(pos.max())} exceeds the KV cache ({cache.shape[2]} slots)")
    kv_dtype = attrs.get("kv_dtype", "float32")
    # the reference updates the cache in place (the IR threads it as a value), storing what a
    # cache of `kv_dtype` would hold: float16-rounded, or int8 codes times their per-token scale
    cache[layer, 0, pos] = kv_storage_round(k, kv_dtype)
    cache[layer, 1, pos] = kv_storage_round(v, kv_dtype)
    span = int(pos.max()) + 1 if pos.size else 0
    keys, values = cache[layer, 0, :span], cache[layer, 1, :span]  # [span, kv, d]
    seq, heads, d = q.shape
    kv = keys.shape[1]
    group = heads // kv
    # batched matmuls per kv head (BLAS): q [kv, seq*group, d] @ keys [kv, d, span] -> [kv, seq*group, span]
    qg = q.reshape(seq, kv, group, d).transpose(1, 0, 2, 3).reshape(kv, seq * group, d)
    scores = np.matmul(qg, keys.transpose(1, 2, 0))
    scores *= np.float32(attrs["scale"])
    if attrs.get("softcap"):  # Gemma 2: scores = softcap * tanh(scale * q.k / softcap)
        cap = np.float32(attrs["softcap"])
        scores = np.tanh(scores / cap, out=scores)
        scores *= cap
    slots = np.arange(span)
    visible = slots[None, :] <= pos[:, None]  # causal: a token sees every slot up to its own position
    if attrs.get("sliding_window"):
        visible &= slots[None, :] > pos[:, None] - attrs["sliding_window"]
    bias = np.where(visible, np.float32(0), np.float32(-np.inf))  # [seq, span]
    scores = scores.reshape(kv, seq, group, span)
    scores += bias[None, :, None, :]
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.matmul(probs.reshape(kv, seq * group, span), values.transpose(1, 0, 2))  # [kv, seq*group, d]
    out = out.reshape(kv, seq, group, d).transpose(1, 0, 2, 3).reshape(seq, heads, d)
    return [out.astype(np.float32), cache]


register("attention", (5, 5), _attention_infer, _attention_ref)


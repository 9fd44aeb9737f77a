"""Round-to-nearest group quantization, plus the scale/zero-point math that GPTQ and AWQ reuse."""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, group_index, group_starts

# Symmetric scale choice (documented for the kernels and the tests):
#   s = max(max(w) / (2^(b-1) - 1), -min(w) / 2^(b-1))
# The codes q - 2^(b-1) span [-2^(b-1), 2^(b-1) - 1]. This s is the smallest one that covers the
# group without clipping on either side, so it uses the extra negative code whenever the group's
# largest magnitude is negative, and never clips otherwise (the plain absmax / 2^(b-1) choice clips
# the positive side; absmax / (2^(b-1) - 1) wastes the most negative code). With no clipping the
# dequantization error of every weight is at most half a step, s / 2.
#
# Asymmetric: s = (max - min) / (2^b - 1) and a FLOAT zero point z = -min / s (stored as fp16), so
# code 0 lands on the group's min and code 2^b - 1 on its max: the whole code range is spent on the
# group's own range (no widening to include 0, no integer rounding of z). This is exactly llama.cpp's
# Q4_1 / Q5_1 form w = q * d + m with d = s, m = -z * s, so re-quantizing a dequantized Q4_1 model
# at int4-g32-asym is lossless up to fp16 rounding of z. The extra error over half a step is
# |z - fp16(z)| steps: at most 2^-8 steps for |z| < 16 (int4), 2^-4 for |z| < 256 (int8).


def as_weight(w: np.ndarray, where: str) -> np.ndarray:
    """float32 [out, in] copy-free view of `w`, rejecting other ranks and non-finite values."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.size == 0:
        raise BitsmithError(f"expected a non-empty 2-D weight [out, in], got shape {w.shape}", where=where,
                            fix="reshape the weight to [out_features, in_features]")
    if not np.isfinite(w).all():
        raise BitsmithError("weight contains NaN or Inf", where=where, fix="check the checkpoint")
    return w


def round_up_fp16(s: np.ndarray) -> np.ndarray:
    """The smallest float16 >= s, elementwise (s >= 0).

    Rounding the scale UP keeps the range covered after storing it as fp16, so the half-step
    bound survives; a scale that underflows fp16 becomes the smallest subnormal, not 0.
    """
    s16 = np.asarray(s, dtype=np.float32).astype(np.float16)
    low = s16.astype(np.float32) < s
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    if not np.isfinite(s16).all():
        raise BitsmithError("a quantization scale exceeds the float16 range (65504)", where="quant scales",
                            fix="the weights are too large for fp16 scales; check the checkpoint")
    return s16


def scale_zero_from_range(wmax: np.ndarray, wmin: np.ndarray, scheme: QuantScheme,
                          clip_ratio: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """fp16 scales and (asym) fp16 zeros from per-group max/min, any matching shapes.

    clip_ratio (scalar or broadcastable) shrinks the range before the scale is taken (AWQ clip).
    Zeros are computed from the already fp16-rounded scale so that q and dequantization agree.
    """
    if scheme.sym:
        wmax = np.maximum(wmax, 0.0) * clip_ratio
        wmin = np.minimum(wmin, 0.0) * clip_ratio
        half = 1 << (scheme.bits - 1)
        s = np.maximum(wmax / (half - 1), -wmin / half)
    else:
        # AWQ-style clip: both ends limited to +-(ratio * absmax) of the group
        limit = np.maximum(np.abs(wmax), np.abs(wmin)) * clip_ratio
        wmax = np.minimum(wmax, limit)
        wmin = np.maximum(wmin, -limit)
        s = (wmax - wmin) / scheme.qmax
    # a constant group has no range: any positive scale works (asym: z alone carries the value)
    s = round_up_fp16(np.where(s > 0, s, 1.0).astype(np.float32))
    if scheme.sym:
        return s, None
    z = (-wmin / s.astype(np.float32)).astype(np.float16)
    if not np.isfinite(z).all():
        raise BitsmithError("an asymmetric zero point exceeds the float16 range", where="quant zeros",
                            fix="use a symmetric scheme for this weight (its groups sit far from 0)")
    return s, z


def group_params(w: np.ndarray, scheme: QuantScheme,
                 clip_ratio: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zeros) float16 [out, n_groups] from each group's min/max of w [out, in]."""
    starts = group_starts(w.shape[1], scheme)
    # reduceat over the group starts: the last group simply runs to the end (partial group)
    wmax = np.maximum.reduceat(w, starts, axis=1)
    wmin = np.minimum.reduceat(w, starts, axis=1)
    return scale_zero_from_range(wmax, wmin, scheme, clip_ratio)


def zero_points(zeros: np.ndarray | None, shape: tuple[int, ...], scheme: QuantScheme) -> np.ndarray:
    """float32 zero points of `shape`: the stored ones, or 2^(bits-1) when symmetric."""
    if zeros is None:
        return np.full(shape, 1 << (scheme.bits - 1), dtype=np.float32)
    return zeros.astype(np.float32)


def quantize_codes(w: np.ndarray, s: np.ndarray, z: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """uint8 codes clip(round(w / s + z), 0, 2^b - 1); s, z float32 broadcastable to w (z may be fractional)."""
    return np.clip(np.rint(w / s + z), 0, scheme.qmax).astype(np.uint8)


def quantize_with_params(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                         scheme: QuantScheme) -> QuantizedWeight:
    """Quantize w [out, in] with given fp16 group scales/zeros [out, n_groups]."""
    out, n_in = w.shape
    g = scheme.effective_group_size(n_in)
    if n_in % g == 0:  # whole groups: broadcast [out, G, 1] over [out, G, g] instead of expanding s and z
        s = scales.astype(np.float32)[:, :, None]
        z = zero_points(zeros, scales.shape, scheme)[:, :, None]
        t = np.divide(w.reshape(out, n_in // g, g), s)
        t += z
        np.rint(t, out=t)
        np.clip(t, 0, scheme.qmax, out=t)
        q = t.astype(np.uint8).reshape(out, n_in)
    else:
        gidx = group_index(n_in, scheme)
        q = quantize_codes(w, scales.astype(np.float32)[:, gidx], zero_points(zeros, scales.shape, scheme)[:, gidx],
                           scheme)
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, scheme=scheme, in_features=n_in)


def quantize_rtn(w: np.ndarray, scheme: QuantScheme,
                 clip_ratio: np.ndarray | float = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in].

    clip_ratio: a scalar or an array [out, n_groups] (from `search_awq_clip`) that shrinks each
    group's range; 1.0 means no clipping and an error of at most half a step per weight.
    """
    w = as_weight(w, f"quantize_rtn {scheme.name}")
    ratio = np.asarray(clip_ratio, dtype=np.float32)
    if ratio.ndim not in (0, 2) or (ratio.ndim == 2 and ratio.shape != (w.shape[0], scheme.n_groups(w.shape[1]))):
        raise BitsmithError(f"clip_ratio has shape {ratio.shape}", where=f"quantize_rtn {scheme.name}",
                            fix=f"give a scalar or an array of shape ({w.shape[0]}, {scheme.n_groups(w.shape[1])})")
    if not np.all((ratio > 0) & (ratio <= 1)):
        raise BitsmithError("clip_ratio must be in (0, 1]", where=f"quantize_rtn {scheme.name}",
                            fix="use ratios from search_awq_clip or 1.0")
    scales, zeros = group_params(w, scheme, ratio)
    return quantize_with_params(w, scales, zeros, scheme)


# Candidate clip ratios for search_mse_clip: 1.0 down to 0.5 in steps of 0.02. Rotated weights are close to
# Gaussian, and for a Gaussian row the 4-bit error is smallest near 0.85-0.9 of its absmax; nothing useful
# sits below 0.5 even at 2 bits with groups of 32.
MSE_CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))
MSE_CLIP_NORM = 2.4  # above 2: a few large rounding errors cost more than many small ones (GPTQ spreads those)
MSE_CLIP_ROWS = 256  # rows per chunk: the candidates' temporaries stay a few MB even for 14336-wide rows


def search_mse_clip(w: np.ndarray, scheme: QuantScheme, ratios: tuple[float, ...] = MSE_CLIP_RATIOS,
                    norm: float = MSE_CLIP_NORM) -> np.ndarray:
    """Per-group clip ratio float32 [out, n_groups] minimising sum |w - dequant(quant(w))|^norm over the group,
    by grid search over `ratios` (data-free: the weight alone). 1.0 is a candidate, so no group ends worse
    than with its full range. For `quantize_rtn(..., clip_ratio=)` and GPTQ's static group parameters."""
    w = as_weight(w, f"search_mse_clip {scheme.name}")
    out, n_in = w.shape
    starts = group_starts(n_in, scheme)
    gidx = group_index(n_in, scheme)
    best = np.ones((out, len(starts)), dtype=np.float32)
    for r0 in range(0, out, MSE_CLIP_ROWS):
        rows = w[r0:r0 + MSE_CLIP_ROWS]
        wmax, wmin = np.maximum.reduceat(rows, starts, axis=1), np.minimum.reduceat(rows, starts, axis=1)
        lowest = np.full(wmax.shape, np.inf)
        for ratio in ratios:
            s16, z16 = scale_zero_from_range(wmax, wmin, scheme, ratio)
            s = s16.astype(np.float32)[:, gidx]
            z = zero_points(z16, s16.shape, scheme)[:, gidx]
            err = np.abs(rows - (quantize_codes(rows, s, z, scheme).astype(np.float32) - z) * s) ** norm
            total = np.add.reduceat(err, starts, axis=1, dtype=np.float64)
            better = total < lowest
            lowest[better] = total[better]
            best[r0:r0 + MSE_CLIP_ROWS][better] = ratio
    return best

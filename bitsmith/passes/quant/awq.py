"""AWQ: per-input-channel scales that protect salient channels, plus a per-group clipping search."""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.rtn import as_weight, quantize_rtn
from bitsmith.passes.quant.scheme import QuantizedWeight, QuantScheme, dequantize, group_starts

# AWQ rewrites y = x W^T as y = (x / s) (W * s)^T with s > 0 per input channel. Scaling a channel
# up before quantization shrinks its relative rounding error; the cost is borne by the other
# channels of its group, whose share of the group range grows. s = mean|x|^alpha puts the
# protection on channels with large activations, and alpha trades protection against damage.

MAX_SHRINK = 0.5  # the clip search tries ratios in (1 - MAX_SHRINK, 1]


def _activations(x: np.ndarray, in_features: int, where: str) -> np.ndarray:
    """float32 [tokens, in] from x of shape [..., in]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != in_features or x.size == 0:
        raise BitsmithError(f"activations have shape {x.shape}, expected [..., {in_features}]", where=where,
                            fix="capture the inputs of this linear (tokens x in_features)")
    return x.reshape(-1, in_features)


def search_awq_scales(weights: list[np.ndarray], x: np.ndarray, scheme: QuantScheme, grid: int = 20) -> np.ndarray:
    """float32 [in] scales s for linears that all read x [tokens, in] (q/k/v, or gate/up).

    Tries alpha in {0, 1/grid, ..., (grid-1)/grid}, s = mean|x|^alpha normalised so that
    sqrt(max(s) * min(s)) = 1, and keeps the s with the smallest summed output error
    sum_W ||x W^T - (x / s) Q(W * s)^T||^2 under round-to-nearest Q. alpha = 0 is s = 1, i.e.
    plain RTN, so the result is never worse than RTN on the calibration tokens.
    """
    where = f"search_awq_scales {scheme.name}"
    if not weights or grid < 1:
        raise BitsmithError(f"need at least one weight and grid >= 1 (got {len(weights)}, {grid})",
                            where=where, fix="pass the linears that share this input")
    ws = [as_weight(w, where) for w in weights]
    in_f = ws[0].shape[1]
    if any(w.shape[1] != in_f for w in ws):
        raise BitsmithError(f"weights disagree on in_features: {[w.shape for w in ws]}", where=where,
                            fix="group only linears that read the same input")
    x = _activations(x, in_f, where)
    # clamp so a channel that is always 0 does not get a 0 (non-invertible) scale
    x_mag = np.maximum(np.abs(x).mean(axis=0), 1e-4)
    # ||x W^T - (x/s) Q(W s)^T||^2 = ||x D^T||^2 with D = W - Q(W s) / s; with more tokens than
    # channels the quadratic form D G D^T on the Gram matrix G = x^T x [in, in] is cheaper
    gram = x.T.astype(np.float64) @ x if x.shape[0] > in_f else None

    best_err, best_s = np.inf, np.ones(in_f, dtype=np.float32)
    for step in range(grid):
        alpha = step / grid
        s = x_mag ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        for w in ws:
            d = w - dequantize(quantize_rtn(w * s, scheme)) / s  # [out, in]
            err += float(np.sum((d @ gram) * d) if gram is not None else np.sum((x @ d.T) ** 2))
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def search_awq_clip(w: np.ndarray, x: np.ndarray, scheme: QuantScheme, grid: int = 20) -> np.ndarray:
    """float32 [out, n_groups] clip ratios minimising each group's share of the output error.

    Call it with the weight already multiplied by s and the activations already divided by s.
    Ratio r shrinks the group's range to r * [min, max]; r is tried on 1 - i * MAX_SHRINK / grid,
    i in [0, grid). A group's error is ||x_g dW_g^T||^2 = dW_g G_g dW_g^T per row, with
    G_g = x_g^T x_g the Gram matrix of the group's input columns, so the groups decouple.
    """
    where = f"search_awq_clip {scheme.name}"
    w = as_weight(w, where)
    x = _activations(x, w.shape[1], where).astype(np.float64)
    starts = list(group_starts(w.shape[1], scheme)) + [w.shape[1]]
    grams = [x[:, a:b].T @ x[:, a:b] for a, b in zip(starts[:-1], starts[1:])]  # [g, g] each

    n_groups = len(grams)
    best_err = np.full((w.shape[0], n_groups), np.inf)
    best_ratio = np.ones((w.shape[0], n_groups), dtype=np.float32)
    for step in range(max(grid, 1)):
        ratio = 1.0 - step * MAX_SHRINK / max(grid, 1)
        dw = (w - dequantize(quantize_rtn(w, scheme, clip_ratio=ratio))).astype(np.float64)
        # per row: dW_g G_g dW_g^T, as one [out, g] x [g, g] product per group
        err = np.stack([np.sum((dw[:, a:b] @ gram) * dw[:, a:b], axis=1)
                        for a, b, gram in zip(starts[:-1], starts[1:], grams)], axis=1)
        better = err < best_err
        best_err[better] = err[better]
        best_ratio[better] = ratio
    return best_ratio


def quantize_awq(w: np.ndarray, x: np.ndarray, scheme: QuantScheme, s: np.ndarray,
                 clip_grid: int = 20) -> QuantizedWeight:
    """Quantize W * s (w: the original float weight [out, in]; s: [in] from `search_awq_scales`).

    The returned weight represents W * s[None, :], NOT W: the caller must divide the activations
    by s, i.e. fold 1/s into the op that produces x (the preceding RMSNorm weight for q/k/v and
    gate/up, v_proj's output rows for o_proj, up_proj's output rows for down_proj). x [tokens, in]
    are the original (unscaled) calibration inputs; they drive the per-group clip search.
    """
    where = f"quantize_awq {scheme.name}"
    w = as_weight(w, where)
    s = np.asarray(s, dtype=np.float32)
    if s.shape != (w.shape[1],) or not np.all(s > 0):
        raise BitsmithError(f"AWQ scales have shape {s.shape} (or are not all > 0)", where=where,
                            fix=f"pass the positive [{w.shape[1]}] scales from search_awq_scales")
    ws = w * s
    xs = _activations(x, w.shape[1], where) / s
    ratios = search_awq_clip(ws, xs, scheme, grid=clip_grid)
    return quantize_rtn(ws, scheme, clip_ratio=ratios)

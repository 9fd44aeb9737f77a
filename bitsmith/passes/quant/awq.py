"""AWQ: per-input-channel scales that protect salient channels, plus a per-group clipping search."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.rtn import as_weight, quantize_rtn
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, dequantize, group_starts

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


AWQ_THREADS = 2  # row chunks searched at once (numpy releases the GIL in its loops and BLAS calls)
MIN_ROWS_PER_THREAD = 256


def _row_spans(rows: int, threads: int = AWQ_THREADS) -> list[tuple[int, int]]:
    n = max(1, min(threads, rows // MIN_ROWS_PER_THREAD))
    bounds = [rows * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _map_rows(fn, rows: int) -> list:
    """[fn((lo, hi)) for each row chunk], the chunks on parallel threads with single-threaded BLAS.

    The searches are row-separable (a row's quantization and its share of the error depend on that row
    alone), so chunks of rows split the work exactly; one BLAS thread per chunk avoids the handoff of each
    product between BLAS threads, which on a busy 2-core host cost more than the products.
    """
    spans = _row_spans(rows)
    with threadpool_limits(limits=1, user_api="blas"):
        if len(spans) == 1:
            return [fn(spans[0])]
        with ThreadPoolExecutor(len(spans)) as pool:
            return list(pool.map(fn, spans))


def _rtn_roundtrip(w: np.ndarray, scheme: QuantScheme, clip_ratio: np.ndarray | float = 1.0) -> np.ndarray:
    """dequantize(quantize_rtn(w, scheme, clip_ratio)), the same float32 values: whole groups broadcast their
    [out, G, 1] scale and zero over [out, G, g] instead of gathering them to [out, in]."""
    qw = quantize_rtn(w, scheme, clip_ratio)
    out, n_in = w.shape
    g = scheme.effective_group_size(n_in)
    if n_in % g:
        return dequantize(qw)
    d = qw.q.reshape(out, n_in // g, g).astype(np.float32)
    d -= qw.zero_points()[:, :, None]
    d *= qw.scales.astype(np.float32)[:, :, None]
    return d.reshape(out, n_in)


def search_awq_scales(weights: list[np.ndarray], x: np.ndarray, scheme: QuantScheme, grid: int = 20) -> np.ndarray:
    """float32 [in] scales s for linears that all read x [tokens, in] (q/k/v, or gate/up).

    Tries alpha in {0, 1/grid, ..., (grid-1)/grid}, s = mean|x|^alpha normalised so that
    sqrt(max(s) * min(s)) = 1, and keeps the s with the smallest summed output error
    sum_W ||x W^T - (x / s) Q(W * s)^T||^2 under round-to-nearest Q. alpha = 0 is s = 1, i.e.
    plain RTN, so the result is never worse than RTN on the calibration tokens.

    The error products run in float32 (summed in float64): on a 1.7B layer they are ~6 TFLOP over the
    grid, and float64 BLAS ran them at a third of float32's speed; float32 keeps each alpha's error to
    ~1e-6 relative, well inside the gaps between alphas.
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
    gram = (x.T.astype(np.float64) @ x).astype(np.float32) if x.shape[0] > in_f else None

    def error(w: np.ndarray, s: np.ndarray) -> float:
        def part(span: tuple[int, int]) -> float:
            rows = w[span[0]:span[1]]
            d = rows - _rtn_roundtrip(rows * s, scheme) / s  # [rows, in]
            prod = d @ gram if gram is not None else x @ d.T
            return float(np.sum(prod * d if gram is not None else prod * prod, dtype=np.float64))
        return sum(_map_rows(part, w.shape[0]))

    best_err, best_s = np.inf, np.ones(in_f, dtype=np.float32)
    for step in range(grid):
        alpha = step / grid
        s = x_mag ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = sum(error(w, s) for w in ws)
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
    out_f, in_f = w.shape
    g = scheme.effective_group_size(in_f)
    starts = list(group_starts(in_f, scheme)) + [in_f]
    n_groups = len(starts) - 1
    whole = in_f % g == 0
    if whole:  # all groups' Gram matrices as one batch [G, g, g]
        xg = x.reshape(x.shape[0], n_groups, g).transpose(1, 0, 2)  # [G, tokens, g]
        grams = np.matmul(xg.transpose(0, 2, 1), xg)
    else:
        grams = [x[:, a:b].T @ x[:, a:b] for a, b in zip(starts[:-1], starts[1:])]  # [g, g] each
    del x
    steps = max(grid, 1)
    ratios = [1.0 - step * MAX_SHRINK / steps for step in range(steps)]

    def part(span: tuple[int, int]) -> np.ndarray:
        rows = w[span[0]:span[1]]
        best_err = np.full((rows.shape[0], n_groups), np.inf)
        best_ratio = np.ones((rows.shape[0], n_groups), dtype=np.float32)
        for ratio in ratios:
            dw = (rows - _rtn_roundtrip(rows, scheme, clip_ratio=ratio)).astype(np.float64)
            # per row: dW_g G_g dW_g^T, as one [rows, g] x [g, g] product per group
            if whole:
                dg = dw.reshape(rows.shape[0], n_groups, g).transpose(1, 0, 2)  # [G, rows, g]
                err = np.sum(np.matmul(dg, grams) * dg, axis=2).T
            else:
                err = np.stack([np.sum((dw[:, a:b] @ gram) * dw[:, a:b], axis=1)
                                for a, b, gram in zip(starts[:-1], starts[1:], grams)], axis=1)
            better = err < best_err
            best_err[better] = err[better]
            best_ratio[better] = ratio
        return best_ratio

    return np.concatenate(_map_rows(part, out_f))


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

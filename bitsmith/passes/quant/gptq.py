"""GPTQ: column-by-column quantization that pushes each column's error onto the not-yet-quantized ones."""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.rtn import (
    as_weight, group_params, quantize_codes, scale_zero_from_range, zero_points)
from bitsmith.passes.quant.scheme import PER_CHANNEL, QuantizedWeight, QuantScheme, group_index


def accumulate_hessian(h: np.ndarray | None, x: np.ndarray, n_seen: int) -> tuple[np.ndarray, int]:
    """Fold a calibration batch into the running H = (2 / n) * sum_t x_t x_t^T.

    h: float64 [in, in] or None for the first batch; x: [tokens, in] (leading dims are flattened);
    n_seen: tokens already folded into h. Returns (h, n_seen + tokens). Keeping H a mean rather
    than a sum keeps its magnitude independent of how much text streams through.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    n_new = x.shape[0]
    if h is None:
        h = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    elif h.shape != (x.shape[1], x.shape[1]):
        raise BitsmithError(f"Hessian is {h.shape} but activations have {x.shape[1]} features",
                            where="accumulate_hessian", fix="feed the inputs of the same linear")
    total = n_seen + n_new
    if total == 0:
        return h, 0
    h = h * (n_seen / total) + (2.0 / total) * (x.T @ x)
    return h, total


def _upper_cholesky_of_inverse(h: np.ndarray, where: str) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (float64 [in, in]).

    Row i of U holds, scaled by U[i, i], how the error of column i is spread onto the columns
    after it once columns < i are fixed: the sequential GPTQ updates in closed form.
    """
    try:
        lower = np.linalg.cholesky(h)
        eye = np.eye(h.shape[0])
        # inv(H) = L^-T L^-1; solve rather than invert H directly for stability
        lower_inv = np.linalg.solve(lower, eye)
        h_inv = lower_inv.T @ lower_inv
        return np.linalg.cholesky(h_inv).T
    except np.linalg.LinAlgError as exc:
        raise BitsmithError(f"Hessian is not positive definite after damping ({exc})", where=where,
                            fix="raise `damp` (e.g. 0.1) or use more calibration tokens") from exc


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, scheme: QuantScheme, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128) -> QuantizedWeight:
    """GPTQ-quantize w [out, in] given the input Hessian [in, in] (see `accumulate_hessian`).

    Columns are quantized one at a time; each column's rounding error, divided by U[i, i], is
    subtracted from the later columns along row i of U (the upper Cholesky factor of the damped
    inverse Hessian). Updates inside a block of `block_size` columns are applied at once, the rest
    lazily with one matrix product per block.

    - damp: damp * mean(diag(H)) is added to the diagonal before factorisation.
    - Dead columns (diag(H) == 0: an input that was always 0) get weight 0 and H[i, i] = 1.
    - act_order: columns are visited in decreasing diag(H) order. The group scales/zeros are then
      STATIC: computed from the original weight in the original column order, before the permuted
      sweep, so q comes back in the original order with ordinary contiguous groups and inference
      needs no g_idx permutation. Without act_order (and with groups), each group's parameters are
      taken from its already error-updated columns when the sweep reaches it (plain GPTQ).
      Per-channel schemes always use parameters from the original row.
    """
    where = f"quantize_gptq {scheme.name}"
    w = as_weight(w, where).copy()
    out_f, in_f = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (in_f, in_f):
        raise BitsmithError(f"Hessian has shape {h.shape}, expected ({in_f}, {in_f})", where=where,
                            fix="accumulate the Hessian from this layer's inputs")
    if block_size < 1 or damp < 0:
        raise BitsmithError(f"bad block_size={block_size} or damp={damp}", where=where,
                            fix="use block_size >= 1 and damp >= 0")

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = scheme.effective_group_size(in_f)
    static = act_order or scheme.group_size == PER_CHANNEL
    gidx = group_index(in_f, scheme)
    if static:
        scales, zeros = group_params(w, scheme)
    else:
        n_groups = scheme.n_groups(in_f)
        scales = np.zeros((out_f, n_groups), dtype=np.float16)
        zeros = None if scheme.sym else np.zeros((out_f, n_groups), dtype=np.float16)
        # a group's parameters must see all of its updates: align blocks to whole groups
        block_size = max(block_size // g, 1) * g

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(in_f)
    w = w[:, perm]
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(in_f)] += damp * np.mean(np.diag(h))
    u = _upper_cholesky_of_inverse(h, where).astype(np.float32)

    q = np.zeros((out_f, in_f), dtype=np.uint8)  # permuted column order during the sweep
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        block = w[:, b0:b1]  # a view: in-block updates land in w directly
        err = np.zeros((out_f, b1 - b0), dtype=np.float32)
        for i in range(b1 - b0):
            col = b0 + i
            grp = gidx[perm[col]]
            if not static and col % g == 0:
                # plain GPTQ: this group's range from its current (error-updated) columns
                cols = block[:, i:i + g]
                s16, z16 = scale_zero_from_range(cols.max(axis=1), cols.min(axis=1), scheme)
                scales[:, grp] = s16
                if zeros is not None:
                    zeros[:, grp] = z16
            s = scales[:, grp].astype(np.float32)
            z = zero_points(None if zeros is None else zeros[:, grp], s.shape, scheme)
            qc = quantize_codes(block[:, i], s, z, scheme)
            q[:, col] = qc
            e = (block[:, i] - (qc.astype(np.float32) - z) * s) / u[col, col]
            block[:, i + 1:] -= np.outer(e, u[col, col + 1:b1])
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]

    q = q[:, np.argsort(perm)]
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, scheme=scheme, in_features=in_f)

"""GPTQ: column-by-column quantization that pushes each column's error onto the not-yet-quantized ones."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.rtn import (
    as_weight, group_params, quantize_codes, scale_zero_from_range, search_mse_clip, zero_points)
from bitsmith.runtime.quant_scheme import PER_CHANNEL, QuantizedWeight, QuantScheme, group_index


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


HESSIAN_CHUNK_TOKENS = 2048  # rows folded into H per float32 GEMM: K large enough for BLAS to run near peak


class HessianAccumulator:
    """H = (2 / n) * sum_t x_t x_t^T over calibration rows streamed in any batch sizes (the pass's path).

    `accumulate_hessian` folds every batch in float64 with a rescale of all of H; on a 1.7B layer that
    cost 100 s (32 batches of 256 rows, 8192^2 float64 products and copies). Here rows are buffered until
    HESSIAN_CHUNK_TOKENS, multiplied in float32 (x is float32 already; a sum over 2048 products keeps
    ~1e-6 relative accuracy) and added into a float64 sum, so the sum over chunks loses nothing more.
    Memory: the float64 sum, one float32 product and the buffered rows.
    """

    def __init__(self, features: int, chunk: int = HESSIAN_CHUNK_TOKENS):
        self.features, self.chunk = features, chunk
        self.sum = np.zeros((features, features), dtype=np.float64)
        self.rows: list[np.ndarray] = []
        self.buffered = 0
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[1] != self.features:
            raise BitsmithError(f"activations have {x.shape[1]} features, the Hessian {self.features}",
                                where="HessianAccumulator", fix="feed the inputs of the same linear")
        self.rows.append(x.copy())  # the caller's activations may be reused after this call
        self.buffered += x.shape[0]
        self.n += x.shape[0]
        if self.buffered >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        x = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
        self.rows, self.buffered = [], 0
        self.sum += x.T @ x  # float32 GEMM, added into float64 without a float64 temporary

    def result(self) -> np.ndarray:
        """float64 [in, in]; the accumulator's own sum, scaled in place (call once, then drop it)."""
        self._flush()
        if self.n:
            self.sum *= 2.0 / self.n
        return self.sum


@dataclass
class GptqFactor:
    """What GPTQ needs from a Hessian, whatever the weight: shared by every linear reading one input
    (q/k/v, gate/up), so the O(in^3) factorisation runs once per input, not once per weight."""

    dead: np.ndarray  # bool [in]: inputs that were always 0
    perm: np.ndarray  # int64 [in]: the sweep order (act_order: decreasing diag(H))
    act_order: bool  # static group parameters (see quantize_gptq)
    u: np.ndarray  # float32 [in, in], permuted order: upper U with (damped H)^-1 = U^T U


def gptq_factor(hessian: np.ndarray, damp: float = 0.01, act_order: bool = True,
                where: str = "gptq_factor") -> GptqFactor:
    """Damp H, order its columns and factor its inverse (see quantize_gptq for the rules)."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise BitsmithError(f"Hessian has shape {h.shape}, expected a square [in, in]", where=where,
                            fix="accumulate the Hessian from this layer's inputs")
    if damp < 0:
        raise BitsmithError(f"bad damp={damp}", where=where, fix="use damp >= 0")
    diag = np.diag(h).copy()
    dead = diag == 0
    diag[dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(len(diag))
    # The factor is taken of the REVERSED permuted matrix: with P the reversal, P H P = L L^T gives
    # H^-1 = U^T U for U = P L^-1 P (upper triangular), i.e. one Cholesky and one triangular inverse
    # (2n^3/3 flops) instead of inverting H and factoring the inverse again (~5n^3).
    rev = perm[::-1]
    hr = h[np.ix_(rev, rev)]  # a new float64 array: the caller's H is left as it was
    # a dead input's row and column are 0 already (its x is always 0); its diagonal becomes 1
    hr[np.diag_indices(len(diag))] = diag[rev] + damp * np.mean(diag)
    return GptqFactor(dead, perm, act_order, _upper_cholesky_of_inverse_reversed(hr, where))


def _upper_cholesky_of_inverse_reversed(hr: np.ndarray, where: str) -> np.ndarray:
    """float32 U (upper, sweep order) from hr = P H P, float64 (overwritten: it is the caller's copy).

    Row i of U holds, scaled by U[i, i], how the error of column i is spread onto the columns after it
    once columns < i are fixed: the sequential GPTQ updates in closed form.
    """
    from scipy.linalg import lapack  # scipy's LAPACK: in-place potrf/trtri on a Fortran view, no copies

    # hr is symmetric, so its C-ordered buffer read as Fortran is the same matrix: factor it in place
    lower, info = lapack.dpotrf(hr.T, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise BitsmithError(f"Hessian is not positive definite after damping (LAPACK potrf info={info})",
                            where=where, fix="raise `damp` (e.g. 0.1) or use more calibration tokens")
    lower_inv, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise BitsmithError(f"Hessian factor is singular (LAPACK trtri info={info})", where=where,
                            fix="raise `damp` (e.g. 0.1) or use more calibration tokens")
    return np.ascontiguousarray(lower_inv[::-1, ::-1], dtype=np.float32)


INNER_BLOCK = 16  # columns updated one at a time; the rest of the outer block gets one GEMM per 16
SWEEP_THREADS = 2  # row chunks swept at once (numpy releases the GIL in its loops and BLAS calls)
MIN_SWEEP_ROWS = 256  # rows per chunk below which a second thread costs more than it saves


def _row_spans(rows: int, threads: int) -> list[tuple[int, int]]:
    n = max(1, min(threads, rows // MIN_SWEEP_ROWS))
    bounds = [rows * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def quantize_gptq(w: np.ndarray, hessian: np.ndarray | None, scheme: QuantScheme, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128, factor: GptqFactor | None = None,
                  threads: int = SWEEP_THREADS, mse_clip: bool = False) -> QuantizedWeight:
    """GPTQ-quantize w [out, in] given the input Hessian [in, in] (see `accumulate_hessian`), or its
    `factor` (from `gptq_factor`, already damped and ordered: hessian, damp and act_order are then unused).

    Columns are quantized one at a time; each column's rounding error, divided by U[i, i], is
    subtracted from the later columns along row i of U (the upper Cholesky factor of the damped
    inverse Hessian). Updates go in three tiers, all the same arithmetic: inside a run of
    INNER_BLOCK columns one column at a time, onto the rest of the `block_size` block with one
    matrix product per run, onto the later blocks with one matrix product per block.

    - damp: damp * mean(diag(H)) is added to the diagonal before factorisation.
    - Dead columns (diag(H) == 0: an input that was always 0) get weight 0 and H[i, i] = 1.
    - act_order: columns are visited in decreasing diag(H) order. The group scales/zeros are then
      STATIC: computed from the original weight in the original column order, before the permuted
      sweep, so q comes back in the original order with ordinary contiguous groups and inference
      needs no g_idx permutation. Without act_order (and with groups), each group's parameters are
      taken from its already error-updated columns when the sweep reaches it (plain GPTQ).
      Per-channel schemes always use parameters from the original row.
    - mse_clip: those static parameters come from ranges clipped per group by `search_mse_clip` (the weight's
      own rounding error, no data); the sweep then spreads the clipped values' error like any other.
    """
    where = f"quantize_gptq {scheme.name}"
    w = as_weight(w, where)
    out_f, in_f = w.shape
    if block_size < 1:
        raise BitsmithError(f"bad block_size={block_size}", where=where, fix="use block_size >= 1")
    if factor is None:
        h = np.asarray(hessian)
        if h.shape != (in_f, in_f):
            raise BitsmithError(f"Hessian has shape {h.shape}, expected ({in_f}, {in_f})", where=where,
                                fix="accumulate the Hessian from this layer's inputs")
        factor = gptq_factor(h, damp, act_order, where)
    elif factor.u.shape != (in_f, in_f):
        raise BitsmithError(f"GPTQ factor is for {factor.u.shape[0]} inputs, the weight has {in_f}", where=where,
                            fix="factor the Hessian of this weight's own input")
    perm, u, act_order = factor.perm, factor.u, factor.act_order

    g = scheme.effective_group_size(in_f)
    static = act_order or scheme.group_size == PER_CHANNEL
    gidx = group_index(in_f, scheme)[perm]  # the group of each column in sweep order
    if factor.dead.any():
        w = w.copy()
        w[:, factor.dead] = 0.0
    inner = INNER_BLOCK
    if mse_clip and not static:
        raise BitsmithError("mse_clip needs static group parameters", where=where,
                            fix="use act_order=True or a per-channel scheme with mse_clip")
    if static:
        scales, zeros = group_params(w, scheme, search_mse_clip(w, scheme) if mse_clip else 1.0)
        s_rows = scales.T.astype(np.float32)  # [groups, out]: a group's parameters are one contiguous row
        z_rows = zero_points(None if zeros is None else zeros.T, s_rows.shape, scheme)
    else:
        s_rows = z_rows = None
        n_groups = scheme.n_groups(in_f)
        scales = np.zeros((out_f, n_groups), dtype=np.float16)
        zeros = None if scheme.sym else np.zeros((out_f, n_groups), dtype=np.float16)
        # a group's parameters must see all of its updates: blocks and runs start on group boundaries
        block_size = max(block_size // g, 1) * g
        inner = math.gcd(inner, g)
    # Rows of W are independent given U, so the sweep runs on row chunks in parallel threads. BLAS is held
    # to one thread meanwhile: the in-block products are tiny (16 x 112 x rows), and a 2-thread BLAS
    # hands each one between threads; on a busy 2-core host that cost 8.3 s of the 15 s sweep of a
    # 2048 x 8192 weight, against 0.15 s single-threaded.
    q = np.empty((in_f, out_f), dtype=np.uint8)
    spans = _row_spans(out_f, threads)

    def sweep(span: tuple[int, int]) -> None:
        lo, hi = span
        wt = np.ascontiguousarray(w[lo:hi, perm].T)  # W^T in sweep order: column i of W is row i here
        sw = s_rows[:, lo:hi] if static else None
        zw = z_rows[:, lo:hi] if static else None
        for b0 in range(0, in_f, block_size):
            b1 = min(b0 + block_size, in_f)
            err = np.empty((b1 - b0, hi - lo), dtype=np.float32)
            for r0 in range(b0, b1, inner):
                r1 = min(r0 + inner, b1)
                for col in range(r0, r1):
                    if not static and col % g == 0:
                        # plain GPTQ: this group's range from its current (error-updated) columns
                        rows = wt[col:col + g]
                        s16, z16 = scale_zero_from_range(rows.max(axis=0), rows.min(axis=0), scheme)
                        scales[lo:hi, gidx[col]] = s16
                        if zeros is not None:
                            zeros[lo:hi, gidx[col]] = z16
                        s = s16.astype(np.float32)
                        z = zero_points(z16, s.shape, scheme)
                    elif static:
                        s, z = sw[gidx[col]], zw[gidx[col]]
                    x = wt[col]
                    qc = quantize_codes(x, s, z, scheme)
                    q[col, lo:hi] = qc
                    e = (x - (qc.astype(np.float32) - z) * s) / u[col, col]
                    err[col - b0] = e
                    if col + 1 < r1:
                        wt[col + 1:r1] -= np.outer(u[col, col + 1:r1], e)
                if r1 < b1:
                    wt[r1:b1] -= u[r0:r1, r1:b1].T @ err[r0 - b0:r1 - b0]
            if b1 < in_f:
                wt[b1:] -= u[b0:b1, b1:].T @ err

    with threadpool_limits(limits=1, user_api="blas"):
        if len(spans) == 1:
            sweep(spans[0])
        else:
            with ThreadPoolExecutor(len(spans)) as pool:
                list(pool.map(sweep, spans))  # list(): a worker's exception is raised here

    q = np.ascontiguousarray(q[np.argsort(perm)].T)
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, scheme=scheme, in_features=in_f)

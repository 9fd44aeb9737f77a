"""Learned rotations (SpinQuant-style): Cayley SGD on R1/R2 against the activation-weighted RTN error of the linears.

The objective (cheaper than SpinQuant's end-to-end loss, which needs a backward pass through the whole model):
for each quantized linear l with calibration inputs X_l (unrotated basis) and weight W_l as the rotations leave it,

    e_l = || X_l Rin (Q(W'_l) - W'_l)^T ||^2 / || X_l W_l^T ||^2      W'_l = Rout^T W_l Rin

(Rin: the rotation its input takes, Rout: the one its output takes; Q: the scheme's round-to-nearest), averaged
over the linears. The denominator is rotation-invariant, so e_l is the relative output error of linear l. With the
Hessian S_l = X_l^T X_l the numerator is tr(E Rin^T S_l Rin E^T). Rounding goes through a straight-through
estimator, so the gradient reaches R through the group scales (their max/min) and through Rin^T S Rin (which
directions of X the error lands in).

S_l is kept as a low-rank factor plus an isotropic tail, S ~= F F^T + t I with F [in, k], k = min(in, tokens, cap)
(LowRankHessian): then tr(E Rin^T S Rin E^T) = ||E (Rin^T F)||^2 + t ||E||^2, so memory is in * k floats per input
instead of in^2 (an 8B Llama's ffn input: 14336 x 512 instead of 14336^2), rotating costs in^2 k instead of in^3,
and the form is exact when k >= rank(S) (t = 0). Under a cap, t spreads the dropped eigenvalues' sum evenly over
the dropped directions, so tr(S) is kept and an error spread evenly over directions (what RTN gives) is still
weighted right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

ORTHOGONALITY_TOL = 1e-5  # re-orthogonalize (QR) when max |R R^T - I| drifts past this
CHECKPOINTS = 4  # full-objective evaluations during learning; the best of them and the start is returned
OVERSAMPLE = 16  # extra directions of the randomized subspace iteration (top_eigen) beyond the k it keeps
POWER_STEPS = 4  # its power iterations: the top k directions separate from the next ones as (l_k / l_p)^(2q+1)


@dataclass(frozen=True)
class LowRankHessian:
    """S ~= factor factor^T + tail * I: factor [in, k] float32 (the top k eigen-directions of S, each scaled by
    sqrt(eigenvalue - tail)), tail >= 0 the mean of the dropped eigenvalues (0: exact)."""

    factor: np.ndarray
    tail: float = 0.0

    @property
    def rank(self) -> int:
        return self.factor.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.factor.nbytes)


def top_eigen(s: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues [k] descending, eigenvectors [n, k]) of a symmetric PSD s, float64. Exact (eigh) when k is
    close to n; otherwise a randomized subspace iteration on k + OVERSAMPLE directions (n^2 k work, not n^3),
    which is exact too when rank(s) <= k + OVERSAMPLE (its range is then found whole)."""
    s = np.asarray(s, dtype=np.float64)
    n = s.shape[0]
    if k + OVERSAMPLE >= n // 2:
        values, vectors = np.linalg.eigh(s)
        return values[::-1][:k], vectors[:, ::-1][:, :k]
    basis = np.random.default_rng(seed).standard_normal((n, k + OVERSAMPLE))
    for _ in range(POWER_STEPS):  # re-orthonormalized each time: the powers would otherwise collapse to one
        basis = np.linalg.qr(s @ basis)[0]
    values, small = np.linalg.eigh(basis.T @ s @ basis)  # Rayleigh-Ritz on the found subspace
    return values[::-1][:k], (basis @ small)[:, ::-1][:, :k]


def _spread_tail(values: np.ndarray, trace: float, n: int) -> tuple[np.ndarray, float]:
    """(sqrt(kept eigenvalues - tail), tail): tail = the dropped eigenvalues' sum over the n - k dropped directions,
    so factor factor^T + tail I has the trace of S."""
    values = np.maximum(values, 0.0)
    k = len(values)
    tail = max(trace - float(values.sum()), 0.0) / (n - k) if k < n else 0.0
    return np.sqrt(np.maximum(values - tail, 0.0)), tail


def factor_hessian(s: np.ndarray, cap: int | None = None, tokens: int | None = None) -> LowRankHessian:
    """S [in, in] (= X^T X over `tokens` rows, when known) as F F^T + t I with k = min(in, tokens, cap)."""
    n = s.shape[0]
    k = min(n, tokens or n, cap or n)
    values, vectors = top_eigen(s, k)
    scales, tail = _spread_tail(values, float(np.trace(s, dtype=np.float64)), n)
    return LowRankHessian((vectors * scales).astype(np.float32), tail)


def factor_activations(x: np.ndarray, cap: int | None = None) -> LowRankHessian:
    """X^T X for activations x [tokens, in] as F F^T + t I, k = min(in, tokens, cap), never forming an [in, in]
    matrix when tokens < in: X^T itself when it fits the cap (exact), else the top eigen-directions of the
    [tokens, tokens] Gram X X^T (X^T u / sqrt(l) are X^T X's eigenvectors for X X^T's (l, u)). Products in
    float32 (as the Hessians were accumulated before), eigen-solves in float64."""
    x = np.asarray(x, dtype=np.float32)
    tokens, n = x.shape
    if tokens > n:
        return factor_hessian(x.T @ x, cap, tokens)
    if cap is None or tokens <= cap:
        return LowRankHessian(np.ascontiguousarray(x.T))
    gram = (x @ x.T).astype(np.float64)
    values, vectors = top_eigen(gram, cap)
    scales, tail = _spread_tail(values, float(np.trace(gram)), n)
    directions = (x.T @ vectors.astype(np.float32)) / np.sqrt(np.maximum(values, 1e-30)).astype(np.float32)
    return LowRankHessian((directions * scales.astype(np.float32)).astype(np.float32), tail)


@dataclass(frozen=True)
class Term:
    """One quantized linear of the objective, in the unrotated basis (norm scales folded, fixed online rotations
    of its input already applied to `weight` and to its Hessian)."""

    weight: np.ndarray  # [out, in] float32
    hessian: str  # key of its input's X^T X [in, in] (stored as a LowRankHessian)
    rows: str | None  # the rotation of its output: "r1" (writes the residual: R1^T W), "r2" (v_proj: R2^T W_h)
    cols: str | None  # the rotation of its input: "r1" (reads the residual: W R1), "r2" (o_proj: W[:, h] R2)
    group: int  # group size along `in` (in: one scale per output channel)
    bits: int
    sym: bool
    batch: int  # the sampling batch it belongs to (its decoder layer): a step draws a few batches


def round_ste(x):
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


def _group_error(part, bits: int, sym: bool):
    """RTN error Q(p) - p of p [out, groups, g] with one scale (and float zero) per group."""
    import torch  # noqa: PLC0415 (passes may use torch; only where rotations are learned)

    pmax, pmin = part.amax(dim=2, keepdim=True), part.amin(dim=2, keepdim=True)
    if sym:  # rtn.scale_zero_from_range: the smallest scale covering the group with codes [-2^(b-1), 2^(b-1) - 1]
        half = 1 << (bits - 1)
        scale = torch.maximum(pmax.clamp(min=0) / (half - 1), -pmin.clamp(max=0) / half)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return round_ste(part / scale) * scale - part
    scale = (pmax - pmin) / ((1 << bits) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -pmin / scale
    return (round_ste(part / scale + zero) - zero) * scale - part


def rtn_error(y, group: int, bits: int, sym: bool):
    """Q(y) - y for y [out, in] under group RTN (a last partial group is its own group), straight-through."""
    import torch  # noqa: PLC0415

    out, n = y.shape
    full = n // group * group
    parts = [_group_error(y[:, :full].reshape(out, -1, group), bits, sym).reshape(out, full)] if full else []
    if full < n:
        parts.append(_group_error(y[:, full:].reshape(out, 1, n - full), bits, sym).reshape(out, n - full))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def rotate_rows(w, kind: str | None, rots: dict):
    """Rout^T W: R1^T W, or per head R2^T W_h over rows [heads * head_dim, in]."""
    if kind is None:
        return w
    if kind == "r1":
        return rots["r1"].T @ w
    import torch  # noqa: PLC0415

    r2 = rots["r2"]
    d = r2.shape[0]
    return torch.einsum("ji,hjk->hik", r2, w.reshape(-1, d, w.shape[1])).reshape(w.shape)


def rotate_cols(w, kind: str | None, rots: dict):
    """W Rin: W R1, or per head W[:, h] R2 over columns [out, heads * head_dim]."""
    if kind is None:
        return w
    if kind == "r1":
        return w @ rots["r1"]
    r2 = rots["r2"]
    d = r2.shape[0]
    return (w.reshape(w.shape[0], -1, d) @ r2).reshape(w.shape)


def rotate_factor(f, kind: str | None, rots: dict):
    """Rin^T F for F [in, k]: Rin^T S Rin = (Rin^T F)(Rin^T F)^T (+ the tail, which any rotation leaves)."""
    return rotate_rows(f, kind, rots)


class Objective:
    """The mean relative RTN output error over a set of terms, differentiable in R1/R2 (torch float32).

    `hessians`: each key's S as a LowRankHessian (a dense array is factored exactly). `signals`: each term's
    || X W^T ||^2, rotation-invariant, so computed once (from the exact S before it was factored, when given;
    else from the factor)."""

    def __init__(self, terms: list[Term], hessians: Mapping[str, LowRankHessian | np.ndarray],
                 signals: Sequence[float] | None = None):
        import torch  # noqa: PLC0415

        self.terms = terms
        self.weights = [torch.from_numpy(np.ascontiguousarray(t.weight, dtype=np.float32)) for t in terms]
        lowrank = {k: v if isinstance(v, LowRankHessian) else factor_hessian(v) for k, v in hessians.items()}
        self.factors = {k: torch.from_numpy(np.ascontiguousarray(v.factor, dtype=np.float32))
                        for k, v in lowrank.items()}
        self.tails = {k: float(v.tail) for k, v in lowrank.items()}
        self.bytes = sum(v.nbytes for v in lowrank.values())  # what the stored factors hold
        if signals is None:  # || X W^T ||^2 = tr(W S W^T): the same under any rotation
            signals = [self._quadratic(w, self.factors[t.hessian], self.tails[t.hessian])
                       for t, w in zip(terms, self.weights)]
        self.signal = [float(v) for v in signals]
        self.batches = sorted({t.batch for t in terms})

    @staticmethod
    def _quadratic(e, factor, tail: float):
        """tr(E (F F^T + t I) E^T)."""
        return ((e @ factor) ** 2).sum() + tail * (e ** 2).sum()

    def errors(self, rots: dict, indices: list[int]):
        """Relative error of each term in `indices` (a torch vector)."""
        import torch  # noqa: PLC0415

        rotated: dict[tuple[str, str | None], object] = {}  # each input's factor rotated once per call
        out = []
        for i in indices:
            term, w = self.terms[i], self.weights[i]
            y = rotate_cols(rotate_rows(w, term.rows, rots), term.cols, rots)
            key = (term.hessian, term.cols)
            if key not in rotated:
                rotated[key] = rotate_factor(self.factors[term.hessian], term.cols, rots)
            err = rtn_error(y, term.group, term.bits, term.sym)
            out.append(self._quadratic(err, rotated[key], self.tails[term.hessian]) / max(self.signal[i], 1e-30))
        return torch.stack(out)

    def indices_of(self, batches) -> list[int]:
        chosen = set(batches)
        return [i for i, t in enumerate(self.terms) if t.batch in chosen]

    def term_errors(self, rots64: dict[str, np.ndarray]) -> np.ndarray:
        """Every term's relative error at these (float64 numpy) rotations; the objective is their mean."""
        import torch  # noqa: PLC0415

        with torch.no_grad():
            rots = {k: torch.from_numpy(v.astype(np.float32)) for k, v in rots64.items()}
            return self.errors(rots, list(range(len(self.terms)))).double().numpy()


def cayley_step(r: np.ndarray, grad: np.ndarray, lr: float, fixed: np.ndarray | None = None) -> np.ndarray:
    """One Cayley step on the orthogonal group: A = G R^T - R G^T (skew), R <- (I + a/2 A)^-1 (I - a/2 A) R.

    Its tangent at a = 0 is -A R, a descent direction (<G, A R> >= 0 for orthogonal R), and the Cayley transform
    of a skew matrix is orthogonal, so R stays orthogonal up to rounding (float64 here). `fixed` channels have
    zero rows and columns in A, so an R that is the identity on them stays so."""
    a = grad @ r.T - r @ grad.T
    if fixed is not None and len(fixed):  # channels R leaves alone (outliers): no rotation mixes them in
        a[fixed, :] = 0
        a[:, fixed] = 0
    eye = np.eye(r.shape[0])
    return np.linalg.solve(eye + lr / 2 * a, (eye - lr / 2 * a) @ r)


def reorthogonalize(r: np.ndarray) -> tuple[np.ndarray, float]:
    """(R, its drift max |R R^T - I|); past ORTHOGONALITY_TOL, R is replaced by the Q of its QR (signs kept)."""
    drift = float(np.abs(r @ r.T - np.eye(r.shape[0])).max())
    if drift <= ORTHOGONALITY_TOL:
        return r, drift
    q, upper = np.linalg.qr(r)
    return q * np.sign(np.diag(upper))[None, :], drift


def learn_rotations(objective: Objective, start: dict[str, np.ndarray], steps: int, lr: float,
                    batches_per_step: int, seed: int,
                    progress: Callable[[int], object] | None = None,
                    fixed: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Cayley SGD from `start` ({"r1": ..., "r2": ...}, float64 orthogonal): each step draws `batches_per_step`
    batches (layers), normalises their error by its value at the start (so `lr` does not depend on the model's
    error level) and takes one Cayley step per matrix, the step size decaying linearly from `lr` to 0. Returns the
    rotations with the lowest full objective among the start and CHECKPOINTS evaluations along the way, and a
    report: objective before/after and at each checkpoint, steps, max orthogonality drift."""
    import torch  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are small: two threads that wait on each other cost 4-60x on a busy host
    try:
        return _cayley_sgd(objective, start, steps, lr, batches_per_step, seed, progress, fixed or {})
    finally:
        torch.set_num_threads(threads)


def _cayley_sgd(objective: Objective, start: dict[str, np.ndarray], steps: int, lr: float, batches_per_step: int,
                seed: int, progress: Callable[[int], object] | None,
                fixed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    import torch  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    rots64 = {k: np.array(v, dtype=np.float64) for k, v in start.items()}
    start_errors = objective.term_errors(rots64)
    before = float(start_errors.mean())
    # each batch's error is divided by its value at the start: every batch weighs 1 in a step's loss
    base = {b: max(float(start_errors[objective.indices_of([b])].sum()), 1e-30) for b in objective.batches}
    best, best_value, max_drift, trace = dict(rots64), before, 0.0, [before]
    checkpoints = {round(steps * k / CHECKPOINTS) for k in range(1, CHECKPOINTS + 1)}
    for step in range(steps):
        rate = lr * (1 - step / steps)  # linear decay to 0, as SpinQuant's schedule: late steps only refine
        batches = rng.choice(objective.batches, size=min(batches_per_step, len(objective.batches)), replace=False)
        rots = {k: torch.from_numpy(v.astype(np.float32)).requires_grad_(True) for k, v in rots64.items()}
        loss = 0.0
        for batch in batches:
            loss = loss + objective.errors(rots, objective.indices_of([batch])).sum() / base[int(batch)]
        (loss / len(batches)).backward()
        for key, r in rots.items():
            if r.grad is not None:
                rots64[key], drift = reorthogonalize(cayley_step(rots64[key], r.grad.double().numpy(), rate,
                                                                        fixed.get(key)))
                max_drift = max(max_drift, drift)
        if step + 1 in checkpoints:  # the steps are stochastic and the rounding makes the objective rugged
            trace.append(float(objective.term_errors(rots64).mean()))
            if trace[-1] < best_value:
                best, best_value = dict(rots64), trace[-1]
        if progress is not None:
            progress(1)
    report = {"objective": "mean relative RTN output error of the quantized linears",
              "before": before, "after": best_value, "checkpoints": trace, "kept": best_value < before,
              "steps": steps, "lr": lr, "batches_per_step": batches_per_step, "terms": len(objective.terms),
              "max_orthogonality_drift": max_drift}
    return best, report

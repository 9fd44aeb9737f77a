"""Learned rotations (SpinQuant-style): Cayley SGD on R1/R2 against the activation-weighted RTN error of the linears.

The objective (cheaper than SpinQuant's end-to-end loss, which needs a backward pass through the whole model):
for each quantized linear l with calibration inputs X_l (unrotated basis) and weight W_l as the rotations leave it,

    e_l = || X_l Rin (Q(W'_l) - W'_l)^T ||^2 / || X_l W_l^T ||^2      W'_l = Rout^T W_l Rin

(Rin: the rotation its input takes, Rout: the one its output takes; Q: the scheme's round-to-nearest), averaged
over the linears. The denominator is rotation-invariant, so e_l is the relative output error of linear l. With the
Hessian S_l = X_l^T X_l the numerator is tr(E Rin^T S_l Rin E^T): only S_l is kept, not X_l. Rounding goes
through a straight-through estimator, so the gradient reaches R through the group scales (their max/min) and
through Rin^T S Rin (which directions of X the error lands in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

ORTHOGONALITY_TOL = 1e-5  # re-orthogonalize (QR) when max |R R^T - I| drifts past this
CHECKPOINTS = 4  # full-objective evaluations during learning; the best of them and the start is returned


@dataclass(frozen=True)
class Term:
    """One quantized linear of the objective, in the unrotated basis (norm scales folded, fixed online rotations
    of its input already applied to `weight` and to its Hessian)."""

    weight: np.ndarray  # [out, in] float32
    hessian: str  # key of X^T X [in, in] (float32) of its input
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


def rotate_hessian(s, kind: str | None, rots: dict):
    """Rin^T S Rin for S [in, in] (per head blocks for R2)."""
    if kind is None:
        return s
    if kind == "r1":
        return rots["r1"].T @ s @ rots["r1"]
    import torch  # noqa: PLC0415

    r2 = rots["r2"]
    d = r2.shape[0]
    h = s.shape[0] // d
    return torch.einsum("ai,hagb,bk->higk", r2, s.reshape(h, d, h, d), r2).reshape(s.shape)


class Objective:
    """The mean relative RTN output error over a set of terms, differentiable in R1/R2 (torch float32)."""

    def __init__(self, terms: list[Term], hessians: dict[str, np.ndarray]):
        import torch  # noqa: PLC0415

        self.terms = terms
        self.weights = [torch.from_numpy(np.ascontiguousarray(t.weight, dtype=np.float32)) for t in terms]
        self.hessians = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in hessians.items()}
        # || X W^T ||^2 = tr(W S W^T): the same under any rotation
        self.signal = [float(((w @ self.hessians[t.hessian]) * w).sum()) for t, w in zip(terms, self.weights)]
        self.batches = sorted({t.batch for t in terms})

    def errors(self, rots: dict, indices: list[int]):
        """Relative error of each term in `indices` (a torch vector)."""
        import torch  # noqa: PLC0415

        rotated_hessians: dict[tuple[str, str | None], object] = {}
        out = []
        for i in indices:
            term, w = self.terms[i], self.weights[i]
            y = rotate_cols(rotate_rows(w, term.rows, rots), term.cols, rots)
            key = (term.hessian, term.cols)
            if key not in rotated_hessians:
                rotated_hessians[key] = rotate_hessian(self.hessians[term.hessian], term.cols, rots)
            err = rtn_error(y, term.group, term.bits, term.sym)
            out.append(((err @ rotated_hessians[key]) * err).sum() / max(self.signal[i], 1e-30))
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

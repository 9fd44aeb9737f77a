"""Orthogonal rotation matrices for QuaRot/SpinQuant-style passes: +-1 Hadamard matrices, randomized ones, factors.

A folded rotation R (d x d, R @ R.T = I) rewrites weights only (y = x W^T, rows = outputs):
    a linear that reads the rotated stream x R:   W <- W @ R         (input columns)
    a linear that writes into it:                 W <- R^T @ W, b <- b @ R   (output rows)
    the embedding table (it writes the stream):   E <- E @ R
An online rotation (runtime/hadamard.py) is H_p kron M / sqrt(p): its M comes from `online_factor`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bitsmith.runtime.hadamard import hadamard_matrix_dense, is_power_of_two, sylvester_hadamard

MAX_ONLINE_FACTOR = 64  # a larger dense factor costs more per value than the butterflies save


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % f for f in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = legendre(j - i mod q) for a prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=np.float64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order n by Paley's constructions over a prime field, else None."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S = [[0, 1^T], [-1, Q]] skew
        s = np.zeros((n, n))
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return np.eye(n) + s
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: C (x) [[1,-1],[-1,-1]] + I (x) [[1,1],[1,-1]]
        c = np.zeros((q + 1, q + 1))
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(c, [[1, -1], [-1, -1]]) + np.kron(np.eye(q + 1), [[1, 1], [1, -1]])
    return None


@lru_cache(maxsize=64)
def _hadamard_pm1(n: int) -> np.ndarray | None:
    if is_power_of_two(n):
        return sylvester_hadamard(n)
    if n % 4:
        return None  # a Hadamard matrix of order > 2 has an order divisible by 4
    for base in range(3, n + 1):  # kron of two Hadamard matrices is one: a Paley base times the rest
        if n % base == 0 and (h := _paley(base)) is not None:
            rest = _hadamard_pm1(n // base)
            if rest is not None:
                return np.kron(h, rest)
    return None


def hadamard_pm1(n: int) -> np.ndarray | None:
    """A +-1 matrix H of order n with H @ H.T = n I (Sylvester, Paley I/II and their Kronecker products), or None."""
    h = _hadamard_pm1(n)
    return None if h is None else h.copy()


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal n x n matrix (QR of a Gaussian, signs fixed), float64."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def online_factor(n: int, seed: int = 0) -> np.ndarray | None:
    """The dense factor M (m x m, orthonormal) with n = p * m, p a power of two, for an online rotation of size n.

    m is the smallest odd-part multiple (n's odd part times a power of two) with a +-1 Hadamard matrix (SmolLM2's
    ffn 1536 = 128 * 12: Paley's order 12), so the transform is a true Hadamard one; without one up to
    MAX_ONLINE_FACTOR, a random orthogonal matrix of the odd part (still orthogonal, less uniform). None: n = 2^k."""
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return None
    m = odd
    while n % m == 0 and m <= MAX_ONLINE_FACTOR:
        if (h := _hadamard_pm1(m)) is not None:
            return h / np.sqrt(m)
        m *= 2
    return random_orthogonal(odd, seed)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """A randomized Hadamard rotation diag(s) @ H / sqrt(n) (s random +-1), float64; when no +-1 Hadamard matrix of
    order n is known, H_p kron M / sqrt(p) with M from online_factor stands in (orthogonal all the same)."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    h = _hadamard_pm1(n)
    base = h / np.sqrt(n) if h is not None else hadamard_matrix_dense(n, online_factor(n, seed))
    return signs[:, None] * base


def check_orthogonal(r: np.ndarray, tol: float = 1e-6) -> float:
    """max |R R^T - I|; raises ValueError above tol (a learned or user matrix that drifted)."""
    err = float(np.abs(r @ r.T - np.eye(r.shape[0])).max())
    if err > tol:
        raise ValueError(f"rotation is not orthogonal: max |R R^T - I| = {err:.2e} > {tol:.0e}")
    return err


def rotate_columns(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """W @ R: a linear [out, in] that reads a rotated input; float32 out."""
    return np.asarray(w, np.float32) @ r.astype(np.float32)


def rotate_rows(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """R^T @ W: a linear [out, in] (or a bias [out]) whose output is rotated; float32 out."""
    w = np.asarray(w, np.float32)
    return w @ r.astype(np.float32) if w.ndim == 1 else r.T.astype(np.float32) @ w


def rotate_head_rows(w: np.ndarray, r: np.ndarray, heads: int) -> np.ndarray:
    """Per-head R^T @ W_h over [heads * head_dim, in] (or a bias [heads * head_dim]): v_proj under R2."""
    w = np.asarray(w, np.float32)
    d = r.shape[0]
    if w.ndim == 1:
        return (w.reshape(heads, d) @ r.astype(np.float32)).reshape(-1)
    return np.einsum("ji,hjk->hik", r.astype(np.float32), w.reshape(heads, d, -1)).reshape(w.shape)


def rotate_head_columns(w: np.ndarray, r: np.ndarray, heads: int) -> np.ndarray:
    """Per-head W[:, h] @ R over [out, heads * head_dim]: o_proj under R2."""
    w = np.asarray(w, np.float32)
    d = r.shape[0]
    return (w.reshape(w.shape[0], heads, d) @ r.astype(np.float32)).reshape(w.shape)

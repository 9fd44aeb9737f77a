"""The online Hadamard transform in numpy: y = x @ (H_p (x) M) / sqrt(p) along the last axis (reference and fallback).

Layout of the last axis, n = p * m (p a power of two, M an m x m orthonormal matrix, m = 1 when absent):

    x[..., a*m + b]      a in [0, p): the Walsh-Hadamard index, b in [0, m): the dense factor's index
    step 1 (dense):      t[..., a, :] = x[..., a, :] @ M                  m*m multiply-adds per group of m
    step 2 (butterfly):  log2(p) passes of (u, v) -> (u + v, u - v) over a, stride m, then * 1/sqrt(p)

so y[..., c*m + d] = sum_{a,b} x[..., a*m + b] * H_p[a, c] * M[b, d] / sqrt(p), with H_p the Sylvester
+-1 matrix (H_1 = [1], H_2p = [[H_p, H_p], [H_p, -H_p]]). The whole map is orthogonal, so a linear that
reads y with its weight's columns multiplied by the same matrix (W @ R) computes what it did before.
"""

from __future__ import annotations

import numpy as np


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester_hadamard(p: int) -> np.ndarray:
    """The +-1 Sylvester Hadamard matrix of order p (a power of two), float64."""
    if not is_power_of_two(p):
        raise ValueError(f"Sylvester Hadamard order {p} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def split_order(n: int, m: int) -> int:
    """p = n / m, checked to be a whole power of two."""
    if m < 1 or n % m or not is_power_of_two(n // m):
        raise ValueError(f"hadamard: size {n} is not a power of two times the factor's order {m}")
    return n // m


def hadamard_transform(x: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
    """x @ (H_p (x) factor) / sqrt(p) along the last axis, float32 in and out (accumulated in float32)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    m = 1 if factor is None else factor.shape[0]
    p = split_order(n, m)
    t = x.reshape(*x.shape[:-1], p, m)
    if factor is not None:
        t = t @ np.asarray(factor, dtype=np.float32)
    t = np.array(t, dtype=np.float32, copy=True)
    h = 1
    while h < p:  # butterflies over the power-of-two axis: pairs (a, a + h) within blocks of 2h
        blocks = t.reshape(*t.shape[:-2], p // (2 * h), 2, h, m)
        u, v = blocks[..., 0, :, :].copy(), blocks[..., 1, :, :]
        blocks[..., 0, :, :] += v
        blocks[..., 1, :, :] = u - v
        h *= 2
    return (t * np.float32(1.0 / np.sqrt(p))).reshape(x.shape)


def hadamard_matrix_dense(n: int, factor: np.ndarray | None = None) -> np.ndarray:
    """The n x n orthogonal matrix hadamard_transform multiplies by (float64), for folding into weights."""
    m = 1 if factor is None else factor.shape[0]
    p = split_order(n, m)
    return np.kron(sylvester_hadamard(p), np.eye(1) if factor is None else np.asarray(factor, np.float64)) / np.sqrt(p)

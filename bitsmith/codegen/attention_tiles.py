"""The per-task steps of the CPU paged-attention kernel that do not touch the KV pool (TVMScript macros): loading
pre-scaled queries, summing a tile's scores, the online-softmax step with an optional soft-cap, finishing the
output; with the vectorizable exp2 and tanh they use. paged_attention.py builds the kernel around them."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from tvm import tirx
from tvm.script import tirx as T


TILE = 32  # positions per online-softmax step (the reduction trees below are written for 32)
# 2^f on [-0.5, 0.5], least squares on Chebyshev nodes: relative error 1.1e-7 in fp32 Horner form
_EXP2_COEFFS = (0.9999999999595282, 0.6931472067218104, 0.2402265121378914, 0.05550327190337649,
                0.009618025577116437, 0.001340044171424479, 0.00015469740248317705)


def _exp2(x: Any) -> Any:
    """2^x for x <= 0 (a fp32 expression, clamped at -126): 2^round(x) from exponent bits times a polynomial."""
    f32 = "float32"
    xv, nv, fv = tirx.Var("e2x", f32), tirx.Var("e2n", f32), tirx.Var("e2f", f32)
    poly = tirx.const(_EXP2_COEFFS[-1], f32)
    for c in _EXP2_COEFFS[-2::-1]:
        poly = poly * fv + tirx.const(c, f32)
    bits = (tirx.Cast("int32", nv) + tirx.const(127, "int32")) << tirx.const(23, "int32")
    body = tirx.Let(fv, xv - nv, poly * tirx.reinterpret(f32, bits))  # f = x - n is exact, in [-0.5, 0.5]
    body = tirx.Let(nv, tirx.floor(xv + tirx.const(0.5, f32)), body)
    return tirx.Let(xv, tirx.max(x, tirx.const(-126.0, f32)), body)


def _tanh(x: Any) -> Any:
    """tanh(x) = sign(x) (1 - t) / (1 + t), t = 2^(-2 |x| log2 e) (absolute error ~2e-7)."""
    f32 = "float32"
    xv, tv = tirx.Var("thx", f32), tirx.Var("tht", f32)
    mag = (tirx.const(1.0, f32) - tv) / (tirx.const(1.0, f32) + tv)
    body = tirx.Let(tv, _exp2(tirx.const(-2.0 * math.log2(math.e), f32) * tirx.abs(xv)),
                    tirx.Select(xv < tirx.const(0.0, f32), -mag, mag))
    return tirx.Let(xv, x, body)


def tile_macros(heads: int, lanes: int, head_dim: int, qscale: float, cap: float = 0.0) -> Any:
    """TVMScript macros for the per-task steps that do not touch the pool. `heads`: query heads per task
    (HG), `lanes`: the head_dim vector width, `qscale`: scale * log2(e), `cap`: the soft-cap in the log2
    domain (softcap * log2(e); 0: none), applied to a tile's scores before its max. Buffers as in `_lower`: qs/acc
    [HG * D], sc/red [HG * TILE], part [HG * lanes], st [HG * 4] (per head: running max, running sum,
    scratch x2).

    start(q, r, h0, qs, acc, st): the task's queries (pre-scaled), zero accumulators, empty softmax.
    scores_sum(part, sc, j): sc[hh, j] = the horizontal sum of part[hh, :] for every head.
    softmax_step(sc, red, st, acc, cnt): the online-softmax step of one tile whose scores are
    sc[hh, :cnt]; leaves the tile's probabilities in sc[hh, :cnt] (zeros past cnt).
    finish(out, r, h0, acc, st) and zeros(out, r, h0): the task's outputs.
    """
    HG, L, D, B = heads, lanes, head_dim, TILE
    assert B == 32, "the tile reductions are written for 32 slots"
    neg = -3.0e38  # the running max before the first tile (exp2 of (neg - m) clamps to ~0)
    exp2, tanh = _exp2, _tanh
    capped = cap != 0.0  # (a Python bool: the macro's `if` is resolved when the script is parsed)

    @T.macro
    def start(q, r, h0, qs, acc, st):
        for hh in T.unroll(HG):
            for d in T.vectorized(D):
                qs[hh * D + d] = q[r, h0 + hh, d] * T.float32(qscale)
                acc[hh * D + d] = T.float32(0)
            st[hh * 4] = T.float32(neg)
            st[hh * 4 + 1] = T.float32(0)

    @T.macro
    def scores_sum(part, sc, j):
        # horizontal sums as halving trees (vector adds, not a chain of scalar adds)
        for hh in T.unroll(HG):
            if L >= 16:
                for l in T.vectorized(8):
                    part[hh * L + l] = part[hh * L + l] + part[hh * L + l + 8]
            if L >= 8:
                for l in T.vectorized(4):
                    part[hh * L + l] = part[hh * L + l] + part[hh * L + l + 4]
            if L >= 4:
                for l in T.vectorized(2):
                    part[hh * L + l] = part[hh * L + l] + part[hh * L + l + 2]
            if L >= 2:
                part[hh * L] = part[hh * L] + part[hh * L + 1]
            sc[hh * B + j] = part[hh * L]

    @T.macro
    def softmax_step(sc, red, st, acc, cnt):
        for hh in T.unroll(HG):
            if capped:  # soft-capped scores: cap * tanh(s / cap) (scale and log2 e cancel in s / cap)
                for j in T.vectorized(B):
                    sc[hh * B + j] = T.float32(cap) * tanh(sc[hh * B + j] * T.float32(1.0 / cap))
            # the tile's max (lanes past cnt masked), as a halving tree
            for j in T.vectorized(B):
                red[hh * B + j] = T.Select(j < cnt, sc[hh * B + j], T.float32(neg))
            for j in T.vectorized(16):
                red[hh * B + j] = T.max(red[hh * B + j], red[hh * B + j + 16])
            for j in T.vectorized(8):
                red[hh * B + j] = T.max(red[hh * B + j], red[hh * B + j + 8])
            for j in T.vectorized(4):
                red[hh * B + j] = T.max(red[hh * B + j], red[hh * B + j + 4])
            for j in T.vectorized(2):
                red[hh * B + j] = T.max(red[hh * B + j], red[hh * B + j + 2])
            # st[2]: the new running max, st[3]: the factor rescaling what came before
            st[hh * 4 + 2] = T.max(st[hh * 4], T.max(red[hh * B], red[hh * B + 1]))
            st[hh * 4 + 3] = exp2(st[hh * 4] - st[hh * 4 + 2])
            st[hh * 4] = st[hh * 4 + 2]
            # probabilities (unnormalized; 0 past cnt) and their sum
            for j in T.vectorized(B):
                sc[hh * B + j] = T.Select(j < cnt, exp2(sc[hh * B + j] - st[hh * 4]), T.float32(0))
            for j in T.vectorized(16):
                red[hh * B + j] = sc[hh * B + j] + sc[hh * B + j + 16]
            for j in T.vectorized(8):
                red[hh * B + j] = red[hh * B + j] + red[hh * B + j + 8]
            for j in T.vectorized(4):
                red[hh * B + j] = red[hh * B + j] + red[hh * B + j + 4]
            for j in T.vectorized(2):
                red[hh * B + j] = red[hh * B + j] + red[hh * B + j + 2]
            st[hh * 4 + 1] = st[hh * 4 + 1] * st[hh * 4 + 3] + (red[hh * B] + red[hh * B + 1])
            for d in T.vectorized(D):
                acc[hh * D + d] = acc[hh * D + d] * st[hh * 4 + 3]

    @T.macro
    def finish(out, r, h0, acc, st):
        for hh in T.unroll(HG):
            for d in T.vectorized(D):
                out[r, h0 + hh, d] = acc[hh * D + d] / st[hh * 4 + 1]

    @T.macro
    def zeros(out, r, h0):
        for hh in T.unroll(HG):
            for d in T.vectorized(D):
                out[r, h0 + hh, d] = T.float32(0)

    return SimpleNamespace(start=start, scores_sum=scores_sum, softmax_step=softmax_step, finish=finish,
                           zeros=zeros)

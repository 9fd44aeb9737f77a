"""Causal attention over one layer's KV cache (grouped-query heads, optional sliding window), in TIR.

One call appends its rows' k/v to the cache and attends every (row, query head) over the cache slots
it can see. Phase 1 (serial) writes k[r], v[r] into slot positions[r]; phase 2 (parallel) starts only
after every write, so the rows of a prefill chunk see each other's keys and values.

Phase 2 runs one task per (row, kv head, group of query heads sharing it): every key/value row is
loaded once for all heads of the group. It is a tiled online softmax with no per-slot scratch: for
each tile of TILE slots it computes the scores (q pre-scaled by scale * log2(e), so the softmax uses
exp2), raises each head's running max to the tile's max, rescales the running sum and the head_dim
accumulator once, and adds the tile's probability-weighted values. Dot products are vectorized over
head_dim and end in halving-tree horizontal sums; the tile's max, exp2 (a polynomial, `_exp2`, not a
libm call) and sum are vectorized over the tile's slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bitsmith.codegen.kernel import c_float
from bitsmith.codegen.target import Target
from bitsmith.errors import BitsmithError

TILE = 32  # cache slots per online-softmax step (the reduction trees below are written for 32)
MAX_CACHE_ELEMENTS = (1 << 31) - 1  # buffer offsets are int32
# 2^f on [-0.5, 0.5], least squares on Chebyshev nodes: relative error 1.1e-7 in fp32 Horner form
_EXP2_COEFFS = (0.9999999999595282, 0.6931472067218104, 0.2402265121378914, 0.05550327190337649,
                0.009618025577116437, 0.001340044171424479, 0.00015469740248317705)


@dataclass(frozen=True)
class AttentionSpec:
    """out[r, h] = softmax_s(scale * q[r, h] . K[s, h // group]) @ V[s, h // group] over the visible slots.

    Arguments: q f32[rows, heads, head_dim], k f32[rows, kv_heads, head_dim],
    v f32[rows, kv_heads, head_dim], positions int64[rows], cache f32[2, ctx, kv_heads, head_dim]
    (updated in place: cache[0] keys, cache[1] values, slot p holds position p), out f32[rows, heads, head_dim].
    Row r sees slots [lo, positions[r]], lo = 0 or positions[r] - sliding_window + 1 (clamped at 0).
    Rows with a position outside [0, ctx) (negative: padding) write nothing and get zeros.
    """

    rows: int
    heads: int
    kv_heads: int
    head_dim: int
    ctx: int
    scale: float
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if min(self.rows, self.heads, self.kv_heads, self.head_dim, self.ctx) < 1:
            problems.append(f"sizes rows={self.rows} heads={self.heads} kv_heads={self.kv_heads} "
                            f"head_dim={self.head_dim} ctx={self.ctx}")
        elif self.heads % self.kv_heads:
            problems.append(f"{self.heads} query heads for {self.kv_heads} kv heads (must divide)")
        elif 2 * self.ctx * self.kv_heads * self.head_dim > MAX_CACHE_ELEMENTS:
            problems.append(f"a cache of 2 x {self.ctx} x {self.kv_heads} x {self.head_dim} floats (int32 offsets)")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding window {self.sliding_window} (use None or >= 1)")
        if not math.isfinite(self.scale):
            problems.append(f"scale {self.scale}")
        if problems:
            raise BitsmithError("cannot build attention for " + ", ".join(problems), where="codegen attention",
                                fix="pick a supported kernel description")

    @property
    def name(self) -> str:
        window = "full" if self.sliding_window is None else f"w{self.sliding_window}"
        return (f"attention_r{self.rows}_h{self.heads}_kv{self.kv_heads}_d{self.head_dim}_c{self.ctx}"
                f"_s{c_float(self.scale)}_{window}")

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.heads // self.kv_heads

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc (KernelSpec protocol): q, k, v, positions, cache (in place), out."""
        return _lower(self, target)


def _lanes(head_dim: int, target: Target) -> int:
    """Widest power-of-two vector (at most one register, at most 16 lanes) dividing head_dim."""
    lanes = min(16, target.lanes(4))
    while lanes > 1 and head_dim % lanes:
        lanes //= 2
    return lanes


def heads_per_task(spec: AttentionSpec, target: Target) -> int:
    """Query heads of one kv head handled by one task: each cache slot is read once for all of them.

    Their accumulators (heads x head_dim floats) should stay in registers: at most half the vector
    register file (32 registers on AVX-512 and NEON, 16 on AVX2/SSE).
    """
    registers = 32 if target.vector_bytes >= 64 or "aarch64" in str(target.tvm.get("mtriple", "")) else 16
    budget = registers // 2 * target.vector_bytes
    per_task = 1
    for n in range(1, spec.group + 1):
        # (and each per-task array stays under the 1 KiB that TVM places on the stack)
        if spec.group % n == 0 and n * spec.head_dim * 4 <= budget and n * max(spec.head_dim, TILE) * 4 < 1024:
            per_task = n
    return per_task


def _exp2(x: Any) -> Any:
    """2^x for x <= 0 (a fp32 expression, clamped at -126): 2^round(x) from exponent bits times a polynomial."""
    from tvm import tirx

    f32 = "float32"
    xv, nv, fv = tirx.Var("e2x", f32), tirx.Var("e2n", f32), tirx.Var("e2f", f32)
    poly = tirx.const(_EXP2_COEFFS[-1], f32)
    for c in _EXP2_COEFFS[-2::-1]:
        poly = poly * fv + tirx.const(c, f32)
    bits = (tirx.Cast("int32", nv) + tirx.const(127, "int32")) << tirx.const(23, "int32")
    body = tirx.Let(fv, xv - nv, poly * tirx.reinterpret(f32, bits))  # f = x - n is exact, in [-0.5, 0.5]
    body = tirx.Let(nv, tirx.floor(xv + tirx.const(0.5, f32)), body)
    return tirx.Let(xv, tirx.max(x, tirx.const(-126.0, f32)), body)


def tile_macros(heads: int, lanes: int, head_dim: int, qscale: float) -> Any:
    """TVMScript macros for the per-task steps that do not touch the cache, shared with the paged
    kernel (`paged_attention.py`). `heads`: query heads per task (HG), `lanes`: the head_dim vector
    width, `qscale`: scale * log2(e). Buffers as in `_lower`: qs/acc [HG * D], sc/red [HG * TILE],
    part [HG * lanes], st [HG * 4] (per head: running max, running sum, scratch x2).

    start(q, r, h0, qs, acc, st): the task's queries (pre-scaled), zero accumulators, empty softmax.
    scores_sum(part, sc, j): sc[hh, j] = the horizontal sum of part[hh, :] for every head.
    softmax_step(sc, red, st, acc, cnt): the online-softmax step of one tile whose scores are
    sc[hh, :cnt]; leaves the tile's probabilities in sc[hh, :cnt] (zeros past cnt).
    finish(out, r, h0, acc, st) and zeros(out, r, h0): the task's outputs.
    """
    from types import SimpleNamespace

    from tvm.script import tirx as T

    HG, L, D, B = heads, lanes, head_dim, TILE
    assert B == 32, "the tile reductions are written for 32 slots"
    neg = -3.0e38  # the running max before the first tile (exp2 of (neg - m) clamps to ~0)
    exp2 = _exp2

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


def _lower(spec: AttentionSpec, target: Target) -> Any:
    from tvm.script import tirx as T

    R, H, KV, D, C = spec.rows, spec.heads, spec.kv_heads, spec.head_dim, spec.ctx
    G = spec.group
    HG = heads_per_task(spec, target)  # query heads per task
    NG = G // HG  # tasks per (row, kv head)
    L = _lanes(D, target)
    DO = D // L
    B = TILE
    W = spec.sliding_window or 0
    windowed = W > 0
    m = tile_macros(HG, L, D, float(spec.scale) * math.log2(math.e))
    start, scores_sum, softmax_step, finish, zeros = m.start, m.scores_sum, m.softmax_step, m.finish, m.zeros

    # parameter buffer types (one object per parameter: a shared one would alias the parameters)
    QBuf, OutBuf = T.Buffer((R, H, D), "float32"), T.Buffer((R, H, D), "float32")
    KBuf, VBuf = T.Buffer((R, KV, D), "float32"), T.Buffer((R, KV, D), "float32")
    PosBuf, CacheBuf = T.Buffer((R,), "int64"), T.Buffer((2, C, KV, D), "float32")

    @T.prim_func
    def attention(q: QBuf, k: KBuf, v: VBuf, positions: PosBuf, cache: CacheBuf, out: OutBuf):
        T.func_attr({"tirx.noalias": True})
        # phase 1: every row's k/v into its slot (serial: later rows win, as in numpy)
        for r in range(R):
            if positions[r] >= T.int64(0) and positions[r] < T.int64(C):
                for kh, d in T.grid(KV, D):
                    cache[0, T.Cast("int32", positions[r]), kh, d] = k[r, kh, d]
                    cache[1, T.Cast("int32", positions[r]), kh, d] = v[r, kh, d]
        # phase 2: one task per (row, kv head, group of HG query heads)
        for task in T.parallel(R * KV * NG):
            r = T.bind(task // (KV * NG))
            kh = T.bind(task // NG % KV)
            h0 = T.bind(kh * G + task % NG * HG)  # first query head of the task
            if positions[r] < T.int64(0) or positions[r] >= T.int64(C):
                zeros(out, r, h0)
            else:
                p = T.bind(T.Cast("int32", positions[r]))
                lo = T.bind(T.max(p - (W - 1), 0) if windowed else 0)
                # stack arrays (global scope under 1 KiB stays off the workspace allocator)
                qs = T.alloc_buffer((HG * D,), "float32")
                acc = T.alloc_buffer((HG * D,), "float32")
                sc = T.alloc_buffer((HG * B,), "float32")
                red = T.alloc_buffer((HG * B,), "float32")
                part = T.alloc_buffer((HG * L,), "float32")
                st = T.alloc_buffer((HG * 4,), "float32")  # per head: running max, running sum, scratch x2
                start(q, r, h0, qs, acc, st)
                for t in range((p - lo) // B + 1):
                    s0 = T.bind(lo + t * B)
                    cnt = T.bind(T.min(B, p + 1 - s0))
                    # scores of the tile (log2 domain): each key row is loaded once for the HG heads
                    for j in range(cnt):
                        for hh in T.unroll(HG):
                            for l in T.vectorized(L):
                                part[hh * L + l] = T.float32(0)
                        for d0 in T.unroll(DO):
                            for hh in T.unroll(HG):
                                for l in T.vectorized(L):
                                    part[hh * L + l] = (part[hh * L + l]
                                                        + qs[hh * D + d0 * L + l] * cache[0, s0 + j, kh, d0 * L + l])
                        scores_sum(part, sc, j)
                    softmax_step(sc, red, st, acc, cnt)
                    # values: each value row is loaded once for the HG heads
                    for j in range(cnt):
                        for d0 in T.unroll(DO):
                            for hh in T.unroll(HG):
                                for l in T.vectorized(L):
                                    acc[hh * D + d0 * L + l] = (acc[hh * D + d0 * L + l]
                                                                + sc[hh * B + j] * cache[1, s0 + j, kh, d0 * L + l])
                finish(out, r, h0, acc, st)

    return attention.with_attr("global_symbol", spec.name)

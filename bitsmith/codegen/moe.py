"""Mixture-of-experts CPU kernels: the router (softmax / top-k / renormalise) and the expert MLPs, computing only the
selected experts, rows grouped by expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm.script import tirx as T

from bitsmith.codegen.dequant import f32
from bitsmith.codegen.spec_checks import DENSE_BITS, PARAM_DTYPES, check_positive, refuse
from bitsmith.codegen.target import Target
from bitsmith.runtime.kernel_dtypes import kernel_dtype
from bitsmith.runtime.packed_layout import LANES, packed_shape

V = 16  # float32 lanes of a dot product's accumulator (one AVX-512 register; LLVM splits it on narrower targets)
CHUNK = 16  # weight rows per parallel task


@dataclass(frozen=True)
class RouterSpec:
    """weights[rows, k], experts int64[rows, k] = top-k of softmax(logits) (scoring "softmax") or of the logits,
    divided by their sum when `normalize`; ties go to the lower expert index (args: logits [rows, E], weights,
    experts)."""

    rows: int
    experts: int
    top_k: int
    scoring: str = "softmax"
    normalize: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, experts=self.experts, top_k=self.top_k)
        if self.scoring not in ("softmax", "logits"):
            problems.append(f"scoring {self.scoring!r} (softmax or logits)")
        if self.top_k > self.experts:
            problems.append(f"top {self.top_k} of {self.experts} experts")
        refuse(problems, "router")

    @property
    def name(self) -> str:
        return (f"router_{self.scoring}_{'norm' if self.normalize else 'raw'}"
                f"_r{self.rows}_e{self.experts}_k{self.top_k}")

    def prim_func(self, target: Target) -> Any:
        """The CPU PrimFunc (the router reads [rows, E] floats: one serial loop, no schedule to speak of)."""
        R, E, K = self.rows, self.experts, self.top_k
        soft, norm = self.scoring == "softmax", self.normalize
        score = (lambda v, m: T.exp(v - m)) if soft else (lambda v, m: v)

        @T.prim_func
        def router(logits: T.Buffer((R, E), "float32"), weights: T.Buffer((R, K), "float32"),
                   experts: T.Buffer((R, K), "int64")):
            T.func_attr({"tirx.noalias": True})
            p = T.alloc_buffer((E,), "float32", scope="local")
            taken = T.alloc_buffer((E,), "int32", scope="local")
            acc = T.alloc_buffer((2,), "float32", scope="local")  # [running max or sum, best value]
            best = T.alloc_buffer((1,), "int32", scope="local")
            for r in range(R):
                acc[0] = logits[r, 0]
                for e in range(E):
                    acc[0] = T.max(acc[0], logits[r, e])
                    taken[e] = 0
                for e in range(E):
                    p[e] = score(logits[r, e], acc[0])
                if soft:  # softmax: divide by the sum of the exponentials
                    acc[1] = T.float32(0)
                    for e in range(E):
                        acc[1] = acc[1] + p[e]
                    for e in range(E):
                        p[e] = p[e] / acc[1]
                acc[0] = T.float32(0)
                for j in range(K):
                    best[0] = -1
                    for e in range(E):  # strict > over ascending e: a tie keeps the lower index
                        if taken[e] == 0 and (best[0] < 0 or p[e] > acc[1]):
                            best[0] = e
                            acc[1] = p[e]
                    taken[best[0]] = 1
                    weights[r, j] = acc[1]
                    experts[r, j] = T.Cast("int64", best[0])
                    acc[0] = acc[0] + acc[1]
                if norm:
                    for j in range(K):
                        weights[r, j] = weights[r, j] / acc[0]

        return router.with_attr("global_symbol", self.name)


@dataclass(frozen=True)
class MoeSpec:
    """y[rows, H] = sum_j w[r, j] * down[e] @ (silu(gate[e] @ x[r]) * (up[e] @ x[r])), e = experts[r, j], for
    experts stacked as gate_up [E, 2I, H] and down [E, H, I]: dense (`bits` 32/16, `dense_dtype`) or packed
    `bits`-bit codes quantized per expert slice (group_size, sym; layout of runtime/packed_layout.py, U = 1).

    Args: x [rows, H], w f32 [rows, k], experts int64 [rows, k], then gate_up, down (dense) or gate_up's
    qweight/scales/[zeros] and down's, then y. The kernel first lists each expert's (row, slot) pairs; then,
    per block of weight rows (in parallel), for each expert with pairs, dequantizes a weight row once into a
    local buffer and dots it with every row routed there: decode reads only its chosen experts' bytes, and a
    batch reads each chosen expert once."""

    rows: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    bits: int = 32
    group_size: int = -1
    sym: bool = True
    dense_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, experts=self.experts, top_k=self.top_k, hidden=self.hidden,
                       inter=self.inter)
        if self.bits in DENSE_BITS:
            if self.dense_dtype not in PARAM_DTYPES or (self.bits == 32) != (self.dense_dtype == "float32"):
                problems.append(f"dense weights of {self.bits} bits as {self.dense_dtype}")
        elif self.bits not in (2, 4, 8):
            problems.append(f"{self.bits}-bit expert weights (use 2, 4 or 8, or dense float)")
        elif self.group_size == 16:
            problems.append("groups of 16 (a GGUF K-quant form: expert kernels read groups of 32/64/128 or per "
                            "channel; requantize the experts, e.g. --requantize with --scheme '*.experts.*=int4-g32')")
        elif self.group_size != -1 and (self.group_size % LANES or self.group_size <= 0):
            problems.append(f"group size {self.group_size} (per channel, or a multiple of {LANES})")
        if self.experts * 2 * self.inter * self.hidden >= 1 << 31:  # element offsets are int32
            problems.append(f"{self.experts} x {2 * self.inter} x {self.hidden} expert weights (at most 2^31 - 1)")
        refuse(problems, "moe", fix="quantize experts with 2/4/8 bits per channel or in groups of 32/64/128")

    @property
    def quantized(self) -> bool:
        return self.bits not in DENSE_BITS

    @property
    def name(self) -> str:
        if self.quantized:
            w = f"b{self.bits}_g{'ch' if self.group_size == -1 else self.group_size}_{'sym' if self.sym else 'asym'}"
        else:
            w = PARAM_DTYPES[self.dense_dtype]
        return f"moe_silu_{w}_r{self.rows}_e{self.experts}_k{self.top_k}_h{self.hidden}_i{self.inter}"

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the weight arguments in order (gate_up's, then down's)."""
        E, H, I = self.experts, self.hidden, self.inter
        out: list[tuple[int, ...]] = []
        for n_out, n_in in ((2 * I, H), (H, I)):
            if not self.quantized:
                out.append((E, n_out, n_in))
                continue
            groups = 1 if self.group_size == -1 else -(-n_in // self.group_size)
            out += [(E,) + packed_shape(n_out, n_in, self.bits)] + [(E, n_out, groups)] * (1 + (not self.sym))
        return out

    def _loaders(self, params: tuple[Any, ...], n_in: int) -> tuple[int, int, Any, Any]:
        """(full blocks, slots per block, block(e, o, kb, j, l), tail(e, o, k)): weight row o of expert e as float32,
        element k = kb*16*S + j*16 + l of a full block, or k of the tail. Packed (U = 1 word of S = 32 / b codes):
        that element sits in word kb*16 + l at bits [j*b, j*b + b) (no division in a full block, so it
        vectorizes); the tail block of L lanes holds k = base + j*L + l in word base_w + l. Dense: S = 1."""
        if not self.quantized:
            w = params[0]
            return n_in // LANES, 1, (lambda e, o, kb, j, l: f32(w[e, o, kb * LANES + l])), \
                (lambda e, o, k: f32(w[e, o, k]))
        b, S = self.bits, 32 // self.bits
        full = n_in // (LANES * S)
        base = full * LANES * S
        tail = max(-(-(n_in - base) // S), 1)
        q, s = params[0], params[1]
        z = params[2] if not self.sym else None
        per_channel = self.group_size == -1

        def deq(e: Any, o: Any, word: Any, shift: Any, g: Any) -> Any:
            code = T.Cast("float32", (q[e, o, word] >> T.Cast("uint32", shift)) & T.uint32((1 << b) - 1))
            zero = T.float32(1 << (b - 1)) if z is None else f32(z[e, o, g])
            return (code - zero) * f32(s[e, o, g])

        def block(e: Any, o: Any, kb: Any, j: Any, l: Any) -> Any:  # a group (a multiple of 16) covers whole slots
            g = 0 if per_channel else (kb * LANES * S + j * LANES) // self.group_size
            return deq(e, o, kb * LANES + l, j * b, g)

        def rest(e: Any, o: Any, k: Any) -> Any:
            g = 0 if per_channel else k // self.group_size
            return deq(e, o, full * LANES + (k - base) % tail, (k - base) // tail * b, g)

        return full, S, block, rest

    def prim_func(self, target: Target) -> Any:
        """The CPU PrimFunc (KernelSpec protocol); GPU targets do not list this family (Target.check refuses)."""
        R, E, K, H, I = self.rows, self.experts, self.top_k, self.hidden, self.inter
        S, N2 = R * K, 2 * I
        wd = "uint32" if self.quantized else kernel_dtype(self.dense_dtype)
        n = len(self.weight_shapes()) // 2

        @T.macro
        def dot(acc, a, row, wrow, n_in):  # sum_k a[row, k] * wrow[k]: 4 independent V-lane chains, then the rest
            for l in T.vectorized(4 * V):
                acc[l] = T.float32(0)
            for kb in range(n_in // (4 * V)):
                for u in T.unroll(4):
                    for l in T.vectorized(V):
                        acc[u * V + l] = acc[u * V + l] + a[row, (kb * 4 + u) * V + l] * wrow[(kb * 4 + u) * V + l]
            for kb in range(n_in // (4 * V) * 4, n_in // V):
                for l in T.vectorized(V):
                    acc[l] = acc[l] + a[row, kb * V + l] * wrow[kb * V + l]
            for l in range(n_in // V * V, n_in):
                acc[0] = acc[0] + a[row, l] * wrow[l]
            for l in range(1, 4 * V):
                acc[0] = acc[0] + acc[l]

        @T.macro
        def dot4(acc, a, r0, r1, r2, r3, wrow, n_in):  # four rows against one wrow: each wrow load serves 4 FMAs
            for l in T.vectorized(4 * V):
                acc[l] = T.float32(0)
            for kb in range(n_in // V):
                for l in T.vectorized(V):
                    acc[l] = acc[l] + a[r0, kb * V + l] * wrow[kb * V + l]
                    acc[V + l] = acc[V + l] + a[r1, kb * V + l] * wrow[kb * V + l]
                    acc[2 * V + l] = acc[2 * V + l] + a[r2, kb * V + l] * wrow[kb * V + l]
                    acc[3 * V + l] = acc[3 * V + l] + a[r3, kb * V + l] * wrow[kb * V + l]
            for l in range(n_in // V * V, n_in):
                acc[0] = acc[0] + a[r0, l] * wrow[l]
                acc[V] = acc[V] + a[r1, l] * wrow[l]
                acc[2 * V] = acc[2 * V] + a[r2, l] * wrow[l]
                acc[3 * V] = acc[3 * V] + a[r3, l] * wrow[l]
            for i in range(4):
                for l in range(1, V):
                    acc[i * V] = acc[i * V] + acc[i * V + l]

        @T.macro
        def fused_dot(acc, a, row, e, o, full, S, block, rest, n_in):  # one routed row: no unpacked copy
            for l in T.vectorized(4 * V):
                acc[l] = T.float32(0)
            for kb in range(full):
                for j in T.unroll(S):  # slot j into chain j % 4 (4 chains from 4 slots on 8-bit, 8 on 4-bit)
                    for l in T.vectorized(LANES):
                        acc[j % 4 * V + l] = acc[j % 4 * V + l] + a[row, kb * LANES * S + j * LANES + l] * block(
                            e, o, kb, j, l)
            for k in range(full * LANES * S, n_in):
                acc[0] = acc[0] + a[row, k] * rest(e, o, k)
            for l in range(1, 4 * V):
                acc[0] = acc[0] + acc[l]

        @T.macro
        def project(src, dst, cnt, order, full, S, block, rest, n_out, n_in, row_of):
            # dst[slot, o] = src[row or slot] . W_e[o, :] for every slot routed to e, weight rows in parallel blocks;
            # a weight row is unpacked once into wrow, then dotted with each routed row
            for c in T.parallel((n_out + CHUNK - 1) // CHUNK):
                wrow = T.alloc_buffer((n_in,), "float32", scope="local")
                acc = T.alloc_buffer((4 * V,), "float32", scope="local")
                for e in range(E):
                    if cnt[e] > 0:
                        for oo in range(CHUNK):
                            if c * CHUNK + oo < n_out and cnt[e] == 1:  # decode: unpack straight into the dot
                                r = row_of(order[e, 0])
                                fused_dot(acc, src, r, e, c * CHUNK + oo, full, S, block, rest, n_in)
                                dst[order[e, 0], c * CHUNK + oo] = acc[0]
                            elif c * CHUNK + oo < n_out:
                                for kb in range(full):
                                    for j in T.unroll(S):
                                        for l in T.vectorized(LANES):
                                            wrow[kb * LANES * S + j * LANES + l] = block(e, c * CHUNK + oo, kb, j, l)
                                for k in range(full * LANES * S, n_in):
                                    wrow[k] = rest(e, c * CHUNK + oo, k)
                                for t4 in range(cnt[e] // 4):  # 4 routed rows per pass over wrow
                                    r0 = row_of(order[e, t4 * 4])  # bound once, not reloaded in the loop
                                    r1 = row_of(order[e, t4 * 4 + 1])
                                    r2 = row_of(order[e, t4 * 4 + 2])
                                    r3 = row_of(order[e, t4 * 4 + 3])
                                    dot4(acc, src, r0, r1, r2, r3, wrow, n_in)
                                    for i in range(4):
                                        dst[order[e, t4 * 4 + i], c * CHUNK + oo] = acc[i * V]
                                for t in range(cnt[e] // 4 * 4, cnt[e]):
                                    rt = row_of(order[e, t])
                                    dot(acc, src, rt, wrow, n_in)
                                    dst[order[e, t], c * CHUNK + oo] = acc[0]

        @T.macro
        def body(x, w, idx, y, ld_gu, ld_dn):
            cnt = T.alloc_buffer((E,), "int32")
            order = T.alloc_buffer((E, S), "int32")  # the (row * k + slot) pairs routed to each expert
            gu = T.alloc_buffer((S, N2), "float32")
            h = T.alloc_buffer((S, I), "float32")
            ys = T.alloc_buffer((S, H), "float32")
            for e in range(E):
                cnt[e] = 0
            for s in range(S):  # an index outside [0, E) is clamped (never reads out of bounds)
                ex = T.Cast("int32", T.max(T.min(idx[s // K, s % K], T.int64(E - 1)), T.int64(0)))
                order[ex, cnt[ex]] = s
                cnt[ex] = cnt[ex] + 1
            project(x, gu, cnt, order, ld_gu[0], ld_gu[1], ld_gu[2], ld_gu[3], N2, H, lambda s: s // K)  # x by token row
            for s in range(S):
                for i in T.vectorized(I):
                    h[s, i] = gu[s, i] / (T.float32(1) + T.exp(T.float32(0) - gu[s, i])) * gu[s, I + i]
            project(h, ys, cnt, order, ld_dn[0], ld_dn[1], ld_dn[2], ld_dn[3], H, I, lambda s: s)  # h by (row, slot)
            for r in range(R):
                for o in T.vectorized(H):
                    y[r, o] = T.float32(0)
                for j in range(K):
                    for o in T.vectorized(H):
                        y[r, o] = y[r, o] + w[r, j] * ys[r * K + j, o]

        shapes = self.weight_shapes()
        dt = [wd] + ["float16"] * (n - 1)

        if n == 1:
            @T.prim_func
            def moe(x: T.Buffer((R, H), "float32"), w: T.Buffer((R, K), "float32"), idx: T.Buffer((R, K), "int64"),
                    g0: T.Buffer(shapes[0], dt[0]), d0: T.Buffer(shapes[1], dt[0]), y: T.Buffer((R, H), "float32")):
                T.func_attr({"tirx.noalias": True})
                body(x, w, idx, y, self._loaders((g0,), H), self._loaders((d0,), I))
        elif n == 2:
            @T.prim_func
            def moe(x: T.Buffer((R, H), "float32"), w: T.Buffer((R, K), "float32"), idx: T.Buffer((R, K), "int64"),
                    g0: T.Buffer(shapes[0], dt[0]), g1: T.Buffer(shapes[1], dt[1]),
                    d0: T.Buffer(shapes[2], dt[0]), d1: T.Buffer(shapes[3], dt[1]), y: T.Buffer((R, H), "float32")):
                T.func_attr({"tirx.noalias": True})
                body(x, w, idx, y, self._loaders((g0, g1), H), self._loaders((d0, d1), I))
        else:
            @T.prim_func
            def moe(x: T.Buffer((R, H), "float32"), w: T.Buffer((R, K), "float32"), idx: T.Buffer((R, K), "int64"),
                    g0: T.Buffer(shapes[0], dt[0]), g1: T.Buffer(shapes[1], dt[1]), g2: T.Buffer(shapes[2], dt[2]),
                    d0: T.Buffer(shapes[3], dt[0]), d1: T.Buffer(shapes[4], dt[1]), d2: T.Buffer(shapes[5], dt[2]),
                    y: T.Buffer((R, H), "float32")):
                T.func_attr({"tirx.noalias": True})
                body(x, w, idx, y, self._loaders((g0, g1, g2), H), self._loaders((d0, d1, d2), I))

        return moe.with_attr("global_symbol", self.name)

"""Causal attention over a paged KV cache (a pool of fixed-size blocks shared by many sequences), in TIR.

The rows of one call may belong to different sequences (decode tokens of many sequences and prefill
chunks together), each row carrying its sequence's block table. Logical position s of a row's sequence
lives in physical block block_tables[r, s // block_size], slot s % block_size. Phase 1 (serial) writes
every row's k/v through its table, converting to the pool's dtype (float32; float16 rounded to nearest;
int8 with one symmetric scale per token and kv head; int4 with a step and a minimum per token and kv head,
two codes a byte, see runtime/kv_layout.py); phase 2 (parallel) starts only after every write,
so the rows of a prefill chunk see each other's keys and values.

Phase 2 runs one task per (row, kv head, group of query heads sharing it): every key/value row is
loaded once for all heads of the group, read through the table (widened, or codes * scale). It is a
tiled online softmax with no per-position scratch: for each tile of TILE positions it computes the
scores (q pre-scaled by scale * log2(e), so the softmax uses exp2), raises each head's running max to
the tile's max, rescales the running sum and the head_dim accumulator once, and adds the tile's
probability-weighted values. Dot products are vectorized over head_dim; the tile's max, exp2 (a
polynomial, `_exp2`, not a libm call) and sum are vectorized over the tile's positions.

Tiles are 32 logical positions aligned to multiples of 32 and block_size is a power of two, so a tile
is a run of whole blocks (block_size < 32) or lies in one block (block_size >= 32): the block table
is read once per block of a tile, not per slot. For int8 the per-token scales multiply the whole dot
product (scores) and the probability (values), not each element; int4 elements are dequantized one by
one (min + code * step) inside the dot products, as the reference rounds them. Key scores go two positions at a
time: one pairing tree sums the lanes of all their heads' dot products.

On a GPU the spec builds gpu/paged_attention.py's kernel instead (same arguments and semantics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import tirx as IB

from bitsmith.codegen.attention_tiles import TILE, tile_macros
from bitsmith.codegen.gpu.paged_attention import paged_attention_func
from bitsmith.codegen.kernel import c_float
from bitsmith.codegen.kv_pool import INT4_MAX, INT8_MAX, KV_DTYPES, pool_buffers
from bitsmith.codegen.spec_checks import refuse
from bitsmith.codegen.target import Target
from bitsmith.codegen.vnni_ir import fold_rows
from bitsmith.runtime.kv_cache import ring_blocks_needed

MAX_CACHE_ELEMENTS = (1 << 31) - 1  # buffer offsets are int32
KEY_GROUP = 2  # key positions whose scores are summed together (see `key_group_scores`)


@dataclass(frozen=True)
class PagedAttentionSpec:
    """out[r, h] = softmax_s(scale * q[r, h] . K_r[s, h // group]) @ V_r[s, h // group], K_r/V_r read
    through row r's block table.

    Arguments, in order: q f32[rows, heads, head_dim], k f32[rows, kv_heads, head_dim],
    v f32[rows, kv_heads, head_dim], positions int64[rows], block_tables int32[rows, max_blocks],
    cache <kv_dtype>[num_blocks, 2, block_size, kv_heads, head_dim] (one layer's pool, updated in place:
    [:, 0] keys, [:, 1] values), only for kv_dtype "int8": scales f32[num_blocks, 2, block_size,
    kv_heads] (updated in place), then out f32[rows, heads, head_dim]. For "int4" the cache is
    uint8[num_blocks, 2, block_size, kv_heads, head_dim / 2] (element 2j in the low nibble of byte j) and the
    scales f32[num_blocks, 2, block_size, kv_heads, 2] hold (step, min).

    Row r (position p) writes its k/v at block block_tables[r, p // block_size], slot p % block_size,
    then sees its sequence's positions [lo, p], lo = 0 or p - sliding_window + 1 (clamped at 0).
    int8 stores scale = max|x| / 127 (1 when that is 0) and codes round_half_even(x / scale) clamped to
    [-127, 127]; int4 stores step = (max x - min x) / 15 (1 when that is 0), min x and codes
    round_half_even((x - min) / step) clamped to [0, 15]; float16 stores x rounded to nearest even.
    Rows with a position outside [0, max_blocks * block_size) (negative: padding) write nothing and get
    zeros. Table entries outside [0, num_blocks) are never dereferenced: a row whose write block is one
    writes nothing, and a row whose visible blocks (those holding [lo, p]) include one gets zeros. Entries
    for blocks wholly outside [lo, p] are not read (they may be stale, e.g. freed by a sliding window).
    With `softcap` the scores are softcap * tanh(scale * q.k / softcap). With `ring_blocks` the tables are
    [rows, ring_blocks] and logical block i is entry i % ring_blocks (see runtime/kv_cache.py `ring_blocks_needed`).
    """

    rows: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    max_blocks: int
    scale: float
    sliding_window: int | None = None
    kv_dtype: str = "float32"
    softcap: float | None = None  # scores = softcap * tanh(scale * q.k / softcap) (Gemma 2)
    ring_blocks: int | None = None  # windowed layers: the table is a ring of this many blocks

    def __post_init__(self) -> None:
        problems = []
        sizes = (self.rows, self.heads, self.kv_heads, self.head_dim, self.block_size, self.num_blocks,
                 self.max_blocks)
        if min(sizes) < 1:
            problems.append(f"sizes rows={self.rows} heads={self.heads} kv_heads={self.kv_heads} "
                            f"head_dim={self.head_dim} block_size={self.block_size} "
                            f"num_blocks={self.num_blocks} max_blocks={self.max_blocks}")
        elif self.heads % self.kv_heads:
            problems.append(f"{self.heads} query heads for {self.kv_heads} kv heads (must divide)")
        elif self.block_size & (self.block_size - 1):
            problems.append(f"block size {self.block_size} (must be a power of two)")
        elif 2 * self.num_blocks * self.block_size * self.kv_heads * self.head_dim > MAX_CACHE_ELEMENTS:
            problems.append(f"a pool of {self.num_blocks} x 2 x {self.block_size} x {self.kv_heads} x "
                            f"{self.head_dim} elements (int32 offsets)")
        elif self.max_blocks * self.block_size > MAX_CACHE_ELEMENTS:
            problems.append(f"{self.max_blocks} blocks of {self.block_size} positions (int32 positions)")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding window {self.sliding_window} (use None or >= 1)")
        if not math.isfinite(self.scale):
            problems.append(f"scale {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            problems.append(f"softcap {self.softcap} (use None or > 0)")
        if self.ring_blocks is not None:
            need = ring_blocks_needed(self.sliding_window, self.rows, self.block_size)
            if need is None or self.ring_blocks < need:
                problems.append(f"a ring of {self.ring_blocks} blocks for window {self.sliding_window} and "
                                f"{self.rows} rows (needs a window and at least {need} blocks)")
        if self.kv_dtype not in KV_DTYPES:
            problems.append(f"kv dtype {self.kv_dtype!r} (use one of {tuple(KV_DTYPES)})")
        elif self.kv_dtype == "int4" and self.head_dim % 2:
            problems.append(f"int4 KV with head_dim {self.head_dim} (two codes a byte: must be even)")
        refuse(problems, "paged attention")

    @property
    def name(self) -> str:
        window = "full" if self.sliding_window is None else f"w{self.sliding_window}"
        cap = "" if self.softcap is None else f"_c{c_float(self.softcap)}"
        ring = "" if self.ring_blocks is None else f"_ring{self.ring_blocks}"
        return (f"paged_attention_r{self.rows}_h{self.heads}_kv{self.kv_heads}_d{self.head_dim}"
                f"_b{self.block_size}_n{self.num_blocks}_m{self.max_blocks}_s{c_float(self.scale)}_{window}"
                f"_{KV_DTYPES[self.kv_dtype]}{cap}{ring}")

    @property
    def table_blocks(self) -> int:
        """Entries of a row's block table: the ring's blocks, or max_blocks."""
        return self.ring_blocks or self.max_blocks

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.heads // self.kv_heads

    @property
    def arg_names(self) -> tuple[str, ...]:
        scales = ("scales",) if self.kv_dtype in ("int8", "int4") else ()
        return ("q", "k", "v", "positions", "block_tables", "cache", *scales, "out")

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol), arguments as `arg_names`."""
        return paged_attention_func(self, threads=True) if target.is_gpu else _lower(self, target)

    def gpu_definition(self) -> Any:
        """The GPU kernel's algorithm with serial loops for its threads (gpu/paged_attention.py); built for a
        CPU it checks the GPU semantics."""
        return paged_attention_func(self, threads=False)


def _lanes(head_dim: int, target: Target) -> int:
    """Widest power-of-two vector (at most one register, at most 16 lanes) dividing head_dim. Where that is
    under 4 lanes (head_dim = 2 mod 4, or odd): the widest of at most 8 lanes not over head_dim, the last
    head_dim % lanes elements of a row then going as one shorter vector (on AVX-512, head_dim 6/18/34/66, one
    thread: 0.75-1.0x the time of 2-lane vectors, int4 at 66 0.53x; 16 lanes were slower than 8)."""
    widest = lanes = min(16, target.lanes(4))
    while lanes > 1 and head_dim % lanes:
        lanes //= 2
    if lanes < 4:
        lanes = min(widest, 8)
        while lanes > head_dim:
            lanes //= 2
    return lanes


def heads_per_task(spec: PagedAttentionSpec, target: Target) -> int:
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


def _lower(spec: PagedAttentionSpec, target: Target) -> Any:
    R, H, KV, D = spec.rows, spec.heads, spec.kv_heads, spec.head_dim
    BS, NB, MB = spec.block_size, spec.num_blocks, spec.max_blocks
    G = spec.group
    HG = heads_per_task(spec, target)  # query heads per task
    NG = G // HG  # tasks per (row, kv head)
    L = _lanes(D, target)
    DO = D // L  # whole vectors of a head
    TL = D - DO * L  # then a tail of TL elements (0 where L divides D: every head_dim = 0 mod 4)
    TAIL = TL > 0  # (a Python bool: the macros' `if` is resolved when they are parsed)
    B = TILE
    SPB = min(BS, B)  # slots of one block inside one tile
    CTX = MB * BS  # positions a block table can address
    TB = spec.table_blocks  # entries of a row's table (a ring: logical block i -> entry i % TB)

    def entry(block: Any) -> Any:
        return block % TB if spec.ring_blocks else block
    W = spec.sliding_window or 0
    windowed = W > 0
    dt = spec.kv_dtype
    quant = dt == "int8"  # codes times a scale per (token, kv head), applied to whole dot products
    int4 = dt == "int4"  # min + code * step per element
    (pool_shape, pool_dtype), scales_shape = pool_buffers(spec)
    PER_LINE = 64 // {"float32": 4, "float16": 2, "int8": 1, "uint8": 1}[pool_dtype]  # pool elements per 64-byte line
    LINES = -(-pool_shape[-1] // PER_LINE)  # cache lines of one kv head's row
    # key positions whose scores one pairing tree sums (1: each alone); the tree takes at most L vectors
    QP = KEY_GROUP if KEY_GROUP * HG <= L else 1
    m = tile_macros(HG, L, D, float(spec.scale) * math.log2(math.e), float(spec.softcap or 0) * math.log2(math.e))
    start, scores_sum, softmax_step, finish, zeros = m.start, m.scores_sum, m.softmax_step, m.finish, m.zeros

    def element(cache: Any, row4: Any, pb: Any, half: int, slot: Any, kh: Any, d: Any) -> Any:
        """Element d of the key (half 0) or value (half 1) at (pb, slot, kh) in float32 (int8: the code; int4:
        from row4, where `unpack_int4` put the row)."""
        if int4:
            return row4[d]
        x = cache[pb, half, slot, kh, d]
        return x if dt == "float32" else tirx.Cast("float32", x)

    def unpack_int4(cache: Any, scales: Any, row4: Any, pb: Any, half: int, slot: Any, kh: Any) -> None:
        """int4 only: row4[:D] = min + code * step of the row at (pb, half, slot, kh), L elements at a time from
        L / 2 contiguous bytes (then the tail's TL), low and high nibbles interleaved by a shuffle (indexing the
        pool with d // 2 inside a vectorized loop would gather byte by byte)."""
        if not int4:
            return
        step, low = scales[pb, half, slot, kh, 0], scales[pb, half, slot, kh, 1]
        for d, n in [(d0 * L, L) for d0 in range(DO)] + ([(DO * L, TL)] if TAIL else []):
            W = n // 2  # bytes of the chunk (n is even: so is head_dim)
            if W == 1:  # one byte, its two nibbles by a vector shift
                raw = tirx.Broadcast(cache[pb, half, slot, kh, d // 2], 2)
                shifts = tirx.Ramp(tirx.const(0, "uint8"), tirx.const(4, "uint8"), 2)  # [lo, hi]
                codes = (raw >> shifts) & tirx.const(15, "uint8x2")
            else:
                raw = cache[pb, half, slot, kh, tirx.Ramp(d // 2, 1, W)]
                nibbles = [raw & tirx.const(15, f"uint8x{W}"), raw >> tirx.const(4, f"uint8x{W}")]
                codes = tirx.Shuffle(nibbles, [i // 2 + (i % 2) * W for i in range(n)])  # [lo0, hi0, lo1, hi1, ...]
            vec = tirx.Cast(f"float32x{n}", codes) * tirx.Broadcast(step, n) + tirx.Broadcast(low, n)
            IB.buffer_store(row4, vec, [tirx.Ramp(d, 1, n)])

    def int4_code(x: Any, low: Any, step: Any) -> Any:
        return tirx.Cast("uint8", T.max(T.min(T.nearbyint((x - low) / step), T.float32(INT4_MAX)), T.float32(0)))

    @T.macro
    def store(src, r, pb, slot, kh, half, cache, scales, qt):
        """Token r's src[r, kh] into the pool at (pb, half, slot, kh) in the pool's dtype."""
        if int4:  # qt: min, max, step
            qt[0] = src[r, kh, 0]
            qt[1] = src[r, kh, 0]
            for d in range(D):
                qt[0] = T.min(qt[0], src[r, kh, d])
                qt[1] = T.max(qt[1], src[r, kh, d])
            qt[2] = (qt[1] - qt[0]) / T.float32(INT4_MAX)
            qt[2] = T.Select(qt[2] > T.float32(0), qt[2], T.float32(1))
            scales[pb, half, slot, kh, 0] = qt[2]
            scales[pb, half, slot, kh, 1] = qt[0]
            for j in range(D // 2):
                cache[pb, half, slot, kh, j] = int4_code(src[r, kh, 2 * j], qt[0], qt[2]) | (
                    int4_code(src[r, kh, 2 * j + 1], qt[0], qt[2]) << T.uint8(4))
        elif quant:
            qt[0] = T.float32(0)
            for d in range(D):
                qt[0] = T.max(qt[0], T.abs(src[r, kh, d]))
            qt[1] = qt[0] / T.float32(INT8_MAX)
            qt[1] = T.Select(qt[1] > T.float32(0), qt[1], T.float32(1))
            scales[pb, half, slot, kh] = qt[1]
            for d in range(D):
                cache[pb, half, slot, kh, d] = T.Cast("int8", T.max(T.min(
                    T.nearbyint(src[r, kh, d] / qt[1]), T.float32(INT8_MAX)), T.float32(-INT8_MAX)))
        else:
            for d in range(D):
                cache[pb, half, slot, kh, d] = T.Cast(dt, src[r, kh, d])

    @T.macro
    def prefetch_next_run(block_tables, cache, r, kh, s2, p):
        """Software prefetch of the keys and values of the next SPB positions after s2 (clamped to p, whose
        blocks are checked): the rows of one kv head are 1/KV of each slot's bytes, scattered over the
        pool, and the hardware prefetchers leave a task latency-bound when the pool is in DRAM."""
        nxt = T.bind(T.min(s2 + 1, p))
        pbn = T.bind(block_tables[r, entry(nxt // BS)])
        for j in T.unroll(SPB):
            for half in T.unroll(2):
                for line in T.unroll(LINES):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        cache[pbn, half, T.min(nxt % BS + j, BS - 1), kh, line * PER_LINE]),
                        T.int32(0), T.int32(2), T.int32(1)))

    @T.macro
    def key_dots(qs, cache, scales, row4, part, u, pb, slot, kh):
        """part[u, hh, :] = lane-wise products of query head hh with the key at (pb, slot, kh), summed over
        the head_dim / L vectors of a head (the lane sums follow)."""
        unpack_int4(cache, scales, row4, pb, 0, slot, kh)
        for hh in T.unroll(HG):
            for l in T.vectorized(L):
                part[(u * HG + hh) * L + l] = T.float32(0)
        for d0 in T.unroll(DO):
            for hh in T.unroll(HG):
                for l in T.vectorized(L):
                    part[(u * HG + hh) * L + l] = part[(u * HG + hh) * L + l] + qs[hh * D + d0 * L + l] * element(
                        cache, row4, pb, 0, slot, kh, d0 * L + l)
        if TAIL:  # into the first TL lanes
            for hh in T.unroll(HG):
                for l in T.vectorized(TL):
                    part[(u * HG + hh) * L + l] = part[(u * HG + hh) * L + l] + qs[hh * D + DO * L + l] * element(
                        cache, row4, pb, 0, slot, kh, DO * L + l)

    def key_group_scores(part, sc, scales, col, pb, slot, kh):
        """sc[hh, col + u] = the lane sum of part[u, hh, :] (times the key's int8 scale) for the QP positions
        u of a group: one pairing tree for all QP x HG sums (~3 ops per sum) and a QP-lane store per head,
        where summing each vector alone (scores_sum) takes 2 ops per halving step and a store per sum."""
        vectors = [part[tirx.Ramp((u * HG + hh) * L, 1, L) if L > 1 else u * HG + hh]
                   for u in range(QP) for hh in range(HG)]
        # a tree folds at most L vectors: more (QP = 1 and HG > L, narrow lanes) go as several trees
        # (odd head_dim: L = 1, each "vector" a scalar, its own sum)
        trees = [fold_rows(vectors[first:first + L], L) if L > 1 else (vectors[first], [0])
                 for first in range(0, len(vectors), L)]
        for hh in range(HG):
            if QP == 1:  # one score: a lane of its tree (a scalar already when the tree has one lane)
                folded, order = trees[hh // L]
                score = folded if len(order) == 1 else tirx.Shuffle([folded], [order.index(hh % L)])
                if quant:
                    score = score * scales[pb, 0, slot, kh]
                IB.buffer_store(sc, score, [hh * B + col])
                continue
            (folded, order), = trees  # (QP > 1 only when QP * HG <= L: one tree)
            scores = tirx.Shuffle([folded], [order.index(u * HG + hh) for u in range(QP)])
            if quant:
                scores = scores * tirx.Shuffle([scales[pb, 0, slot + u, kh] for u in range(QP)], list(range(QP)))
            IB.buffer_store(sc, scores, [tirx.Ramp(hh * B + col, 1, QP)])

    def value_scale(scales, pb, slot, kh):
        return scales[pb, 1, slot, kh] if quant else T.float32(1)

    @T.macro
    def body(q, k, v, positions, block_tables, cache, scales, out):
        # phase 1: every row's k/v into its sequence's block (serial: later rows win, as in numpy)
        qt = T.alloc_buffer((3,), "float32")  # int8: max |x|, scale; int4: min, max, step
        for r in range(R):
            if positions[r] >= T.int64(0) and positions[r] < T.int64(CTX):
                p = T.bind(T.Cast("int32", positions[r]))
                pb = T.bind(block_tables[r, entry(p // BS)])
                if pb >= 0 and pb < NB:
                    for kh in range(KV):
                        store(k, r, pb, p % BS, kh, 0, cache, scales, qt)
                        store(v, r, pb, p % BS, kh, 1, cache, scales, qt)
        # phase 2: one task per (row, kv head, group of HG query heads)
        for task in T.parallel(R * KV * NG):
            r = T.bind(task // (KV * NG))
            kh = T.bind(task // NG % KV)
            h0 = T.bind(kh * G + task % NG * HG)  # first query head of the task
            if positions[r] < T.int64(0) or positions[r] >= T.int64(CTX):
                zeros(out, r, h0)
            else:
                p = T.bind(T.Cast("int32", positions[r]))
                lo = T.bind(T.max(p - (W - 1), 0) if windowed else 0)
                # stack arrays (global scope under 1 KiB stays off the workspace allocator)
                qs = T.alloc_buffer((HG * D,), "float32")
                acc = T.alloc_buffer((HG * D,), "float32")
                sc = T.alloc_buffer((HG * B,), "float32")
                red = T.alloc_buffer((HG * B,), "float32")
                part = T.alloc_buffer((QP * HG * L,), "float32")
                row4 = T.alloc_buffer((D if int4 else 1,), "float32")  # int4: the key or value row, dequantized
                st = T.alloc_buffer((HG * 4,), "float32")  # per head: running max, running sum, scratch x2
                ok = T.alloc_buffer((1,), "int32")
                # every block holding a visible position must be in the pool (never dereference others)
                ok[0] = 1
                for b in range(p // BS - lo // BS + 1):
                    if block_tables[r, entry(lo // BS + b)] < 0 or block_tables[r, entry(lo // BS + b)] >= NB:
                        ok[0] = 0
                if ok[0] == 0:
                    zeros(out, r, h0)
                else:
                    start(q, r, h0, qs, acc, st)
                    for t in range(p // B - lo // B + 1):
                        t0 = T.bind((lo // B + t) * B)  # the tile's first logical position
                        a = T.bind(T.max(lo, t0))  # its visible positions: [a, e]; sc[hh, s - a]
                        e = T.bind(T.min(p, t0 + B - 1))
                        c0 = T.bind((a - t0) // SPB)  # its first block, counted in SPB-slot steps
                        # scores of the tile (log2 domain), block by block: one table read per block
                        for c in range((e - t0) // SPB - c0 + 1):
                            s1 = T.bind(T.max(a, t0 + (c0 + c) * SPB))
                            s2 = T.bind(T.min(e, t0 + (c0 + c) * SPB + SPB - 1))
                            pb = T.bind(block_tables[r, entry(s1 // BS)])
                            base = T.bind(s1 % BS)
                            prefetch_next_run(block_tables, cache, r, kh, s2, p)
                            for jp in range((s2 - s1 + 1) // QP):  # QP positions at a time (see `key_group_scores`)
                                for u in T.unroll(QP):
                                    key_dots(qs, cache, scales, row4, part, u, pb, base + jp * QP + u, kh)
                                key_group_scores(part, sc, scales, s1 - a + jp * QP, pb, base + jp * QP, kh)
                            for j in range((s2 - s1 + 1) // QP * QP, s2 - s1 + 1):
                                key_dots(qs, cache, scales, row4, part, 0, pb, base + j, kh)
                                scores_sum(part, sc, s1 - a + j)
                                if quant:
                                    for hh in T.unroll(HG):
                                        sc[hh * B + s1 - a + j] = sc[hh * B + s1 - a + j] * scales[pb, 0, base + j, kh]
                        softmax_step(sc, red, st, acc, e - a + 1)
                        # values, block by block: each value row is loaded once for the HG heads
                        for c in range((e - t0) // SPB - c0 + 1):
                            s1 = T.bind(T.max(a, t0 + (c0 + c) * SPB))
                            s2 = T.bind(T.min(e, t0 + (c0 + c) * SPB + SPB - 1))
                            pb = T.bind(block_tables[r, entry(s1 // BS)])
                            base = T.bind(s1 % BS)
                            for j in range(s2 - s1 + 1):  # (int8: the value's scale joins its probability)
                                unpack_int4(cache, scales, row4, pb, 1, base + j, kh)
                                for d0 in T.unroll(DO):
                                    for hh in T.unroll(HG):
                                        for l in T.vectorized(L):
                                            acc[hh * D + d0 * L + l] = acc[hh * D + d0 * L + l] + sc[
                                                hh * B + s1 - a + j] * value_scale(scales, pb, base + j, kh) * element(
                                                cache, row4, pb, 1, base + j, kh, d0 * L + l)
                                if TAIL:
                                    for hh in T.unroll(HG):
                                        for l in T.vectorized(TL):
                                            acc[hh * D + DO * L + l] = acc[hh * D + DO * L + l] + sc[
                                                hh * B + s1 - a + j] * value_scale(scales, pb, base + j, kh) * element(
                                                cache, row4, pb, 1, base + j, kh, DO * L + l)
                    finish(out, r, h0, acc, st)

    # parameter buffer types (one object per parameter: a shared one would alias the parameters)
    QBuf, OutBuf = T.Buffer((R, H, D), "float32"), T.Buffer((R, H, D), "float32")
    KBuf, VBuf = T.Buffer((R, KV, D), "float32"), T.Buffer((R, KV, D), "float32")
    PosBuf, TabBuf = T.Buffer((R,), "int64"), T.Buffer((R, TB), "int32")
    PoolBuf, ScaleBuf = T.Buffer(pool_shape, pool_dtype), T.Buffer(scales_shape, "float32")

    if quant or int4:
        @T.prim_func
        def paged_attention(q: QBuf, k: KBuf, v: VBuf, positions: PosBuf, block_tables: TabBuf, cache: PoolBuf,
                            scales: ScaleBuf, out: OutBuf):
            T.func_attr({"tirx.noalias": True})
            body(q, k, v, positions, block_tables, cache, scales, out)
    else:
        @T.prim_func
        def paged_attention(q: QBuf, k: KBuf, v: VBuf, positions: PosBuf, block_tables: TabBuf, cache: PoolBuf,
                            out: OutBuf):
            T.func_attr({"tirx.noalias": True})
            body(q, k, v, positions, block_tables, cache, cache, out)  # (no scales: never read)

    return paged_attention.with_attr("global_symbol", spec.name)

"""The TIR of the int8-activation VNNI GEMV (QGemvI8Spec, gemv_int8.py), through the IR builder.

Same arguments and weights as GemvSpec (x f32 [batch, in], packed uint32 codes, fp16 scales, [fp16
zeros], y f32 [batch, out]). The kernel quantizes x per 32 values (sx = max|x| / 127, xq = rint(x * 127
/ max|x|)) and multiplies u8 weight codes by s8 activation codes with `vpdpbusd` (4 byte products per
int32 lane) instead of converting every weight to fp32:
    y[n, o] = sum over 32-blocks B of  sx_B s_g (sum_{k in B} q_k xq_k  -  z_g sum_{k in B} xq_k)
Layout (b = 4, packing.py): word l of a 128-value block holds nibble j of k = 16 j + l. One `vpshufb`
transposes the 4x4 byte tiles of each 16-byte chunk, so int32 lane 4c + i holds byte i of words 4c..4c+3,
and masking low / high nibbles (planes p = 0, 1) leaves 4 u8 codes at k = 32 i + 16 p + 4c + t. Every
lane lies in the 32-block and group of its column i = lane % 4, so per block 4 values (activation
scales, zero-point sums, weight scales) reach the 16 lanes as a 128-bit broadcast. b = 8: one plane,
k = 16 i + 4c + t. Per 128 int4 weights: a load, a shuffle, 3 mask/shift ops, 2 vpdpbusd, int->float,
2 fp ops and the scale conversion: faster than the fp32-dequant kernel in cache, about DRAM speed
(bench/kernels.md). Once per call x is quantized into that byte order (serial) with, per block and
column, sx and the zero-point term: -z sum xq as the int32 start of the lanes c = 0 (sym), or
sx sum xq / (lanes / 4), times the fp16 zero, per lane (asym). Batch rows sit side by side per block;
past ~24 KiB of activations the rows are swept in passes over L1-sized slices of k (a parallel launch
each, y accumulating). Tails of 4 or 8 lanes (in % 128 = 32 or 64 at b = 4, e.g. 576) run the same code
on 128/256-bit vectors, other tails a scalar loop.

Many rows (batch >= 2, compute-bound): the first full blocks go in chunks of 4. A chunk's words are
transposed (128-bit column c of block b -> lane group b of vector c) before the unpack, so int32 lane
4 b + i holds column i of block b in all 4 P vectors: a lane stays in one 32-block for the whole chunk,
4 P vpdpbusd per batch row accumulate 16 different 32-blocks, and one int->float conversion, scale
and FMA serve 512 values (b = 4) instead of 128. Each batch tile unpacks a row's chunks again: unpacking
them once into a stack buffer for every tile ran as fast with weights in cache but slower with weights
streamed from DRAM (those 24 vector stores per row, in a C loop too, stop the DRAM traffic from
overlapping the compute). 4/8-lane tails keep plane p of 16 / L batch rows side by
side, so one 512-bit vpdpbusd and one float step cover them. Rows of 2+ chunks go two output rows at a
time (batch tile 4): each activation vector loaded feeds both rows' vpdpbusd. Lane sums end in shuffle
trees that pair rows up, and y is written 16 outputs (a cache line per row) at a time: a store per
output to rows of y 49152 floats apart falls in one L1 set and evicted lines before they filled.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitsmith.codegen.gemv_schedule import batch_tile
from bitsmith.codegen.vnni_ir import (expand_lanes, hmax, llvm_intrin, local_buffer, prefetch, qgemv_i8_args, row_sums,
                                      unpack_codes)
from bitsmith.runtime.packed_layout import LANES, lane_unit

XBLOCK = 32  # activation values per int8 scale
PREFETCH = (8192, 3)  # software prefetch of the codes: (bytes ahead, llvm locality); 0 bytes: none
L1_ACTIVATION_BYTES = 48 << 10  # activations a pass keeps in L1 (Zen 5: 48 KiB; 16 rows of 1536 in one pass)
Y_BLOCK = 16  # outputs a thread computes before storing them to y, one cache line per batch row
CHUNK_BLOCKS = 4  # blocks whose codes one chunk transposes (see `_chunked`)
CHUNK_MIN_BATCH = 2  # batch rows from which chunks pay for their transposes
PAIR_ROWS = (4, 32)  # batch rows for which two output rows share activation loads (see `chunk_block`)
PAIR_TILE = 4  # their batch tile: the codes of two rows and 2 x 4 accumulators fit the registers


def _chunked(spec: Any) -> bool:
    """Whether the kernel runs its first full blocks in chunks of 4 (see `build_qgemv_i8`): every lane of a chunk
    must lie in one 32-block and one group, and the group pattern of the lanes must not depend on the chunk."""
    _, slots = lane_unit(spec.bits)
    block = LANES * slots
    chunk_k, lane_k = CHUNK_BLOCKS * block, block // 4
    group = spec.group
    fits = group == spec.in_features or group % chunk_k == 0 or (chunk_k % group == 0 and group % lane_k == 0)
    return spec.batch >= CHUNK_MIN_BATCH and spec.in_features >= chunk_k and fits


def _vector_tail(spec: Any, full: int, lanes: int, planes: int, block: int) -> bool:
    """Whether the tail block runs the VNNI code: 4 or 8 lanes, each in the 32-block of its column."""
    blocks = [{k // XBLOCK for k in _lane_ks(full * block, lanes, planes, lane, spec.in_features)}
              for lane in range(lanes)]
    return lanes in (4, 8) and all(len(b) <= 1 and b <= (blocks[lane % 4] or b) for lane, b in enumerate(blocks))


def _lane_ks(base: int, lanes: int, planes: int, lane: int, n_in: int) -> list[int]:
    """The k (< n_in) whose codes lane `lane` = 4c + i of a block of `lanes` lanes holds after the shuffle."""
    c, i = divmod(lane, 4)
    return [k for p in range(planes) for t in range(4)
            if (k := base + (planes * i + p) * lanes + 4 * c + t) < n_in]


def _xpos(kk: Any, lanes: int, planes: int) -> Any:
    """Byte offset within a block of `lanes` lanes of the activation for element kk of the block."""
    j, lane = tirx.floordiv(kk, lanes), tirx.floormod(kk, lanes)
    c, t = tirx.floordiv(lane, 4), tirx.floormod(lane, 4)
    return tirx.floormod(j, planes) * (4 * lanes) + 16 * c + 4 * tirx.floordiv(j, planes) + t


def build_qgemv_i8(spec: Any) -> Any:
    """The PrimFunc of a QGemvI8Spec (the module docstring describes it)."""
    n_out, n_in, batch, bits, group = spec.out_features, spec.in_features, spec.batch, spec.bits, spec.group
    _, slots = lane_unit(bits)
    P, BK = 8 // bits, LANES * slots  # u8 planes per word (nibbles: 2), k per full block (128 / 64)
    full, rest = divmod(n_in, BK)
    L, nb32 = -(-rest // slots), -(-n_in // XBLOCK)  # tail lanes, 32-blocks per row
    per_block = BK // XBLOCK  # activation scales per full block
    zconst = 1 << (bits - 1)
    base = full * BK  # first k of the tail
    vtail = rest > 0 and _vector_tail(spec, full, L, P, BK)
    tail_bytes = 4 * P * L if vtail else 0
    f32, i32 = (lambda v: tirx.const(v, "float32")), (lambda v: tirx.const(v, "int32"))
    # output rows per iteration (see `chunk_block`): two where rows have 2+ chunks (faster at 16 rows with
    # weights from DRAM); with one chunk and a tail it gained nothing, and at 64 rows it lost (bench/kernels.md)
    OB = Y_BLOCK if n_out % Y_BLOCK == 0 else 1  # outputs per parallel iteration (see `rows`)
    pair_rows = OB % 2 == 0 and PAIR_ROWS[0] <= batch <= PAIR_ROWS[1]
    OP = 2 if pair_rows and _chunked(spec) and n_in // (CHUNK_BLOCKS * BK) >= 2 else 1
    tile = batch_tile(batch, PAIR_TILE if OP == 2 else None)
    # a 4- or 8-lane tail block: the float steps of 16 // L batch rows share one 16-lane vector
    paired_tail = vtail and L in (4, 8) and tile % (LANES // L) == 0 and tile > 1
    tail_rows = LANES // L if paired_tail else 1
    cdtype = "int32" if spec.sym else "float32"
    # blocks per pass over the rows: a pass's activations (codes + 32 B of scales and sums per block and
    # batch row) stay in L1 while every row of the pass reads them
    chunk = max(1, L1_ACTIVATION_BYTES // (batch * (BK + 32)))
    # chunks: the first `nchunk` groups of 4 full blocks. Their codes are transposed so that int32 lane
    # l = 4 b + i of a vector holds column i of block b: each lane stays in one 32-block and group for the
    # whole chunk (4 P vpdpbusd per batch row), and one int->float conversion and scaling serves 16 lanes
    # of 16 different 32-blocks (b = 4) instead of 4 per block
    #     chunk codes m = 4 p + c (plane p, 128-bit column c of each block's words):
    #       vector m, lane 4 b + i  =  block b, lane 4 c + i, plane p      (lane l covers k in [l KC/16, ..))
    nchunk = full // CHUNK_BLOCKS if _chunked(spec) else 0
    KC, LW = CHUNK_BLOCKS * BK, BK // 4  # k per chunk, k per lane of a chunk
    if nchunk:
        chunk = max(CHUNK_BLOCKS, chunk // CHUNK_BLOCKS * CHUNK_BLOCKS)
    passes = max(1, -(-full // chunk))

    # scratch: per block (the tail block is number `full`), the batch rows side by side (rows `in` bytes
    # apart would alias in L1); 4 values per block and batch row in sx4 / c4, one per column i
    def xq_at(n: Any, blk: Any) -> Any:
        return (blk * batch + n) * BK

    def meta_at(n: Any, blk: Any) -> Any:
        return (blk * batch + n) * 4

    def tail_at(n: Any, byte: Any) -> Any:
        """Where byte `byte` of row n's tail block (plane p at p 4L, as `_xpos`) lives. Paired tails keep
        plane p of 16 // L rows side by side: one 512-bit vpdpbusd covers them all."""
        if not paired_tail:
            return xq_at(n, full) + byte
        first, plane, within = n - tirx.floormod(n, tail_rows), tirx.floordiv(byte, 4 * L), tirx.floormod(byte, 4 * L)
        return xq_at(first, full) + plane * 4 * L * tail_rows + tirx.floormod(n, tail_rows) * 4 * L + within

    def chunk_at(n: Any, ch: Any) -> Any:  # the chunk's 4 blocks, same bytes as xq_at(n, 4 ch ..)
        return (ch * batch + n) * KC

    def lane_meta(n: Any, ch: Any) -> Any:
        return (ch * batch + n) * LANES

    # per column i (lanes 4c + i share one 32-block and group): first k of the column's lane c = 0
    full_k = [min(_lane_ks(0, LANES, P, i, BK)) for i in range(4)]
    tail_k = [min(_lane_ks(base, L, P, i, n_in), default=base) for i in range(4)] if vtail else []

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x, w, s, z, y = qgemv_i8_args(spec)
            xq = T.alloc_buffer(((full + vtail) * batch * BK or 64,), "int8")  # in the shuffled order
            sxb = T.alloc_buffer((batch * nb32,), "float32")  # scale per 32-block
            sx4 = T.alloc_buffer(((full + vtail) * batch * 4 or 4,), "float32")  # activation scales
            c4 = T.alloc_buffer(((full + vtail) * batch * 4 or 4,), cdtype)  # zero-point terms
            xf = T.alloc_buffer((batch * max(rest, 1),), "float32")  # sx * xq of a scalar tail
            sxc = T.alloc_buffer((max(nchunk, 1) * batch * LANES,), "float32")  # chunks: scale per lane
            sxt = T.alloc_buffer((batch * max(L, 1),), "float32")  # paired tail: scale per lane
            ct = T.alloc_buffer((batch * max(L, 1),), cdtype)  # paired tail: zero-point term per lane
            cc16 = T.alloc_buffer((max(nchunk, 1) * batch * LANES,), cdtype)  # chunks: zero-point term per lane

            # ---- 1. quantize x (once per call, shared by every row)
            def scale_of(n: Any, b32: Any, amax: Any) -> Any:
                T.buffer_store(sxb, amax / f32(127.0), [n * nb32 + b32])
                return T.bind(tirx.Select(amax > f32(0.0), f32(127.0) / amax, f32(0.0)))

            def rint(v: Any) -> Any:
                return tirx.min(tirx.max(T.nearbyint(v), f32(-127.0)), f32(127.0))

            with T.serial(0, batch) as n:
                def quantize_blocks(b0: int, b1: int, chunked: bool) -> None:
                    """32 values at a time: 2 vectors of 16 consecutive k = 2 slots of one lane column."""
                    with T.serial(b0, b1) as b:
                        kb, h = tirx.floordiv(b, per_block), tirx.floormod(b, per_block)
                        halves = [T.bind(x[n, tirx.Ramp(b * XBLOCK + 16 * u, 1, 16)]) for u in range(2)]
                        amax = hmax(T.bind(tirx.max(tirx.abs(halves[0]), tirx.abs(halves[1]))), 16)
                        inv = scale_of(n, b, amax)
                        for u, v in enumerate(halves):
                            q = T.bind(tirx.Cast("int8x16", rint(v * tirx.Broadcast(inv, 16))))
                            j = 2 * h + u  # slot: plane j % P, byte j // P of each word; lanes 4c + t
                            if chunked:  # vector 4 p + c, lane 4 b + i of the chunk
                                ch, bb = tirx.floordiv(kb, CHUNK_BLOCKS), tirx.floormod(kb, CHUNK_BLOCKS)
                                at = chunk_at(n, ch) + tirx.floormod(j, P) * 256 + 16 * bb + 4 * tirx.floordiv(j, P)
                                step = 64
                            else:
                                at, step = xq_at(n, kb) + tirx.floormod(j, P) * 64 + 4 * tirx.floordiv(j, P), 16
                            for c in range(4):
                                T.buffer_store(xq, tirx.Shuffle([q], list(range(4 * c, 4 * c + 4))),
                                               [tirx.Ramp(at + step * c, 1, 4)])

                if nchunk:
                    quantize_blocks(0, nchunk * CHUNK_BLOCKS * per_block, True)
                if full > nchunk * CHUNK_BLOCKS:
                    quantize_blocks(nchunk * CHUNK_BLOCKS * per_block, full * per_block, False)
                if vtail:  # padding codes stay 0
                    with T.serial(0, tail_bytes) as r:
                        T.buffer_store(xq, tirx.const(0, "int8"), [tail_at(n, r)])
                for k0 in range(base, n_in, XBLOCK):  # the tail, one value at a time
                    size = min(XBLOCK, n_in - k0)
                    m = local_buffer((1,), "float32")
                    T.buffer_store(m, f32(0.0), [0])
                    with T.serial(0, size) as r:
                        T.buffer_store(m, tirx.max(m[0], tirx.abs(x[n, k0 + r])), [0])
                    inv = scale_of(n, k0 // XBLOCK, m[0])
                    with T.serial(0, size) as r:
                        code = rint(x[n, k0 + r] * inv)
                        if vtail:
                            T.buffer_store(xq, tirx.Cast("int8", code), [tail_at(n, _xpos(k0 - base + r, L, P))])
                        else:
                            T.buffer_store(xf, code * sxb[n * nb32 + k0 // XBLOCK],
                                           [n * max(rest, 1) + k0 - base + r])

                # per block and column i: the activation scale, and the zero-point term: -z * sum xq (sym,
                # added to the lanes of c = 0 as the dot products' start value) or sx * sum xq shared by
                # the column's lanes / 4 lanes (asym, times the fp16 zero)
                def column_terms(lanes: int, xat: Any, meta: Any, b32: Any, pattern: list[int],
                                 per_lane: bool = False, plane_stride: int = 0) -> None:
                    """sx4 / c4 of one block; `per_lane`: also sxt / ct spread to the tail's lanes."""
                    share = 4.0 / lanes  # asym: each of the column's lanes / 4 lanes adds its share
                    sx = expand_lanes(lambda i: sxb[i], n * nb32 + b32, pattern)
                    T.buffer_store(sx4, sx, [tirx.Ramp(meta, 1, 4)])
                    total = tirx.Broadcast(i32(0), lanes)
                    ones = tirx.Broadcast(tirx.const(1, "int8"), 4 * lanes)
                    for p in range(P):  # vpdpbusd with u8 ones: per-lane sums of 4 codes
                        total = llvm_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", total, ones,
                                        xq[tirx.Ramp(xat + p * (plane_stride or 4 * lanes), 1, 4 * lanes)])
                    while lanes > 4:  # lanes 4c + i -> column i
                        lanes //= 2
                        total = T.bind(tirx.Shuffle([total], list(range(lanes)))
                                       + tirx.Shuffle([total], list(range(lanes, 2 * lanes))))
                    term = (total * tirx.Broadcast(i32(-zconst), 4) if spec.sym
                            else sx * tirx.Cast("float32x4", total) * tirx.Broadcast(f32(share), 4))
                    T.buffer_store(c4, term, [tirx.Ramp(meta, 1, 4)])
                    if per_lane:  # the paired tail reads them per lane, batch rows side by side
                        spread = [lane % 4 for lane in range(L)]
                        copies = L // 4  # Shuffle takes at most the lanes it is given
                        T.buffer_store(sxt, tirx.Shuffle([T.bind(sx)] * copies, spread), [tirx.Ramp(n * L, 1, L)])
                        # sym: the whole -z sum xq of a column starts one of its lanes (c = 0), as in
                        # vector_block; asym: every lane its share (term already holds 4 / L of it)
                        if L == 4:  # one lane per column
                            start = term
                        elif spec.sym:
                            start = tirx.Shuffle([T.bind(term), tirx.Broadcast(i32(0), L - 4)],
                                                 list(range(4)) + [4] * (L - 4))
                        else:
                            start = tirx.Shuffle([T.bind(term)] * copies, spread)
                        T.buffer_store(ct, start, [tirx.Ramp(n * L, 1, L)])

                if full > nchunk * CHUNK_BLOCKS:
                    with T.serial(nchunk * CHUNK_BLOCKS, full) as kb:
                        column_terms(LANES, xq_at(n, kb), meta_at(n, kb), kb * per_block,
                                     [k // XBLOCK for k in full_k])
                if nchunk:  # per chunk and lane: the activation scale, the zero-point term
                    with T.serial(0, nchunk) as ch:
                        sx = expand_lanes(lambda i: sxb[i], n * nb32 + ch * (KC // XBLOCK),
                                     [lane * LW // XBLOCK for lane in range(LANES)])
                        T.buffer_store(sxc, sx, [tirx.Ramp(lane_meta(n, ch), 1, LANES)])
                        total = tirx.Broadcast(i32(0), LANES)
                        ones = tirx.Broadcast(tirx.const(1, "int8"), 64)
                        for m in range(4 * P):
                            total = llvm_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", total, ones,
                                            xq[tirx.Ramp(chunk_at(n, ch) + 64 * m, 1, 64)])
                        term = (T.bind(total) * tirx.Broadcast(i32(-zconst), LANES) if spec.sym
                                else sx * tirx.Cast("float32x16", total))
                        T.buffer_store(cc16, term, [tirx.Ramp(lane_meta(n, ch), 1, LANES)])
                if vtail:
                    b0 = min(k // XBLOCK for k in tail_k)
                    column_terms(L, tail_at(n, 0), meta_at(n, full), b0, [k // XBLOCK - b0 for k in tail_k],
                                 per_lane=paired_tail, plane_stride=4 * L * tail_rows)

            # ---- 2. rows in parallel: VNNI dot products per block, fp32 scaling per block
            def vector_block(o: Any, nb: Any, acc: Any, words: Any, lanes: int, blk: Any, g0: Any,
                             pattern: list[int]) -> None:
                """acc[ni, lanes] += this block's terms for the tile's batch rows."""
                codes = unpack_codes(words, lanes, P)
                cols = [pattern[lane % 4] for lane in range(lanes)]
                scale = expand_lanes(lambda i: s[o, i], g0, cols)
                zero = None if z is None else expand_lanes(lambda i: z[o, i], g0, cols)
                vdp = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
                spread = [lane % 4 for lane in range(lanes)]
                for ni in range(tile):
                    n = nb * tile + ni
                    meta = tirx.Ramp(meta_at(n, blk), 1, 4)
                    if spec.sym:  # -z sum xq on the lanes of c = 0
                        dot = c4[meta] if lanes == 4 else tirx.Shuffle(
                            [c4[meta], tirx.Broadcast(i32(0), lanes - 4)], list(range(4)) + [4] * (lanes - 4))
                    else:
                        dot = tirx.Broadcast(i32(0), lanes)
                    for p, code in enumerate(codes):
                        dot = llvm_intrin(f"int32x{lanes}", vdp, dot, code,
                                      xq[tirx.Ramp(xq_at(n, blk) + p * 4 * lanes, 1, 4 * lanes)])
                    val = tirx.Cast(f"float32x{lanes}", dot) * tirx.Shuffle([sx4[meta]] * (lanes // 4), spread)
                    if zero is not None:
                        val = val - zero * tirx.Shuffle([c4[meta]] * (lanes // 4), spread)
                    here = tirx.Ramp(ni * lanes, 1, lanes)
                    T.buffer_store(acc, acc[here] + val * scale, [here])

            def prefetch_chunk(o: Any, ch: Any) -> None:
                """The codes PREFETCH[0] bytes past chunk ch of row o (the rows that come next)."""
                for bb in range(CHUNK_BLOCKS if PREFETCH[0] else 0):
                    prefetch(w[o, (ch * CHUNK_BLOCKS + bb) * LANES + PREFETCH[0] // 4], PREFETCH[1])

            def chunk_codes(o: Any, ch: Any) -> list[Any]:
                """Chunk ch of row o as 4 P int8 x 64 vectors of u8 codes, vector m = 4 p + c (see above)."""
                words = [w[o, tirx.Ramp((ch * CHUNK_BLOCKS + bb) * LANES, 1, LANES)] for bb in range(CHUNK_BLOCKS)]
                codes: list[Any] = [None] * (4 * P)
                for c in range(4):  # 128-bit column c of every block, then the usual unpack
                    col = T.bind(tirx.Shuffle(words, [bb * LANES + 4 * c + e for bb in range(4) for e in range(4)]))
                    for p, code in enumerate(unpack_codes(col, LANES, P)):
                        codes[4 * p + c] = code
                return codes

            def chunk_block(outs: list[Any], nb: Any, accs: list[Any], ch: Any, codes: list[list[Any]]) -> None:
                """accs[i][ni, 16] += chunk ch's terms of output row outs[i] for the tile's batch rows (lane l:
                its own 32-block). The rows share each activation load: with weights streamed from DRAM the
                activation loads are what slows these kernels (bench/serve.md), and two rows halve them."""
                lane_group = [(lane * LW) // group for lane in range(LANES)]
                if group >= KC or group == n_in:
                    g0, pattern = tirx.floordiv(ch * KC, group), [0] * LANES
                else:
                    g0, pattern = ch * (KC // group), lane_group
                scales = [expand_lanes(lambda i, o=o: s[o, i], g0, pattern) for o in outs]
                zeros = [None if z is None else expand_lanes(lambda i, o=o: z[o, i], g0, pattern) for o in outs]
                for ni in range(tile):
                    n = nb * tile + ni
                    meta = tirx.Ramp(lane_meta(n, ch), 1, LANES)
                    dots = [cc16[meta] if spec.sym else tirx.Broadcast(i32(0), LANES)] * len(outs)
                    for m in range(4 * P):
                        x8 = T.bind(xq[tirx.Ramp(chunk_at(n, ch) + 64 * m, 1, 64)]) if len(outs) > 1 else \
                            xq[tirx.Ramp(chunk_at(n, ch) + 64 * m, 1, 64)]
                        dots = [llvm_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", dot, row_codes[m], x8)
                                for dot, row_codes in zip(dots, codes)]
                    for acc, dot, scale, zero in zip(accs, dots, scales, zeros):
                        val = tirx.Cast("float32x16", dot) * sxc[meta]
                        if zero is not None:
                            val = val - zero * cc16[meta]
                        here = tirx.Ramp(ni * LANES, 1, LANES)
                        T.buffer_store(acc, acc[here] + val * scale, [here])

            def paired_tail_block(o: Any, nb: Any, tacc: Any, g0: Any, pattern: list[int]) -> None:
                """tacc += the tail block's terms: integer dots per batch row on L lanes, then the float steps
                of 16 // L rows at once (their lanes side by side, as sxt / ct and tacc hold them)."""
                per = LANES // L
                codes = [tirx.Shuffle([code] * per, list(range(64)))  # the row's codes once per batch row
                         for code in unpack_codes(w[o, tirx.Ramp(full * LANES, 1, L)], L, P)]
                cols = [pattern[lane % 4] for lane in range(L)]
                scale = tirx.Shuffle([expand_lanes(lambda i: s[o, i], g0, cols)] * per, list(range(LANES)))
                zero = None if z is None else tirx.Shuffle([expand_lanes(lambda i: z[o, i], g0, cols)] * per,
                                                           list(range(LANES)))
                for gi in range(tile // per):
                    n0 = nb * tile + gi * per
                    rows16 = tirx.Ramp(n0 * L, 1, LANES)
                    dot = ct[rows16] if spec.sym else tirx.Broadcast(i32(0), LANES)
                    for p, code in enumerate(codes):  # plane p of the `per` rows: one 512-bit vector
                        dot = llvm_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", dot, code,
                                      xq[tirx.Ramp(tail_at(n0, p * 4 * L), 1, 64)])
                    val = tirx.Cast("float32x16", dot) * sxt[rows16]
                    if zero is not None:
                        val = val - zero * ct[rows16]
                    here = tirx.Ramp(gi * per * L, 1, LANES)
                    T.buffer_store(tacc, tacc[here] + val * scale, [here])

            def scalar_tail(o: Any, xat: Any) -> Any:
                """Sum over the tail (any lane count) of s_g (q - z_g) sx xq_k, one value at a time."""
                part = local_buffer((1,), "float32")
                T.buffer_store(part, f32(0.0), [0])
                with T.serial(0, slots) as j, T.serial(0, L) as lane:
                    with T.If(j * L + lane < rest), T.Then():
                        code = (w[o, full * LANES + lane] >> tirx.Cast("uint32", j * bits)) & ((1 << bits) - 1)
                        g = tirx.floordiv(base + j * L + lane, group)
                        zero = f32(zconst) if z is None else tirx.Cast("float32", z[o, g])
                        term = (tirx.Cast("float32", code) - zero) * tirx.Cast("float32", s[o, g])
                        T.buffer_store(part, part[0] + term * xf[xat + j * L + lane], [0])
                return part[0]

            def rows(kb0: Any, count: Any, first: Any, last: Any) -> None:
                """y (+)= the blocks kb0 .. kb0 + count - 1 (and the tail when `last`) of every row. Sums go to a
                small buffer and reach y OB outputs at a time: one store per cache line, where a store per output
                to rows of y `n_out` floats apart (49152: 192 KiB, one L1 set) evicts lines before they fill."""
                with T.parallel(0, n_out // OB) as ob:
                    accs = [local_buffer((tile * LANES,), "float32") for _ in range(OP)]
                    taccs = [local_buffer((tile * max(L, 1),), "float32") for _ in range(OP)]
                    ybuf = local_buffer((batch * OB,), "float32")
                    with T.serial(0, OB // OP) as oi2:
                        outs = [ob * OB + oi2 * OP + i for i in range(OP)]
                        chunks = tirx.floordiv(tirx.max(tirx.min(count, nchunk * CHUNK_BLOCKS - kb0), 0), CHUNK_BLOCKS)
                        with T.serial(0, batch // tile) as nb:
                            # no full block (in < BK): acc is never read, so it gets no zeroing store either: TVM's
                            # StorageRewrite gave ybuf the storage of that write-only acc, and the store zeroed ybuf
                            # per output row (y was 0 but for the last output of every 16; issue 20)
                            for acc in accs if full else []:
                                T.buffer_store(acc, tirx.Broadcast(f32(0.0), tile * LANES), [tirx.Ramp(0, 1, tile * LANES)])
                            first_block, blocks = kb0, count
                            if nchunk:  # the pass's chunks (passes start on a chunk), then its other blocks
                                with T.serial(0, chunks) as cc:
                                    ch = tirx.floordiv(kb0, CHUNK_BLOCKS) + cc
                                    for o in outs:  # again in every batch tile: hoisted before the
                                        prefetch_chunk(o, ch)  # tiles, the kernel ran much slower
                                    chunk_block(outs, nb, accs, ch, [chunk_codes(o, ch) for o in outs])
                                first_block, blocks = kb0 + chunks * CHUNK_BLOCKS, count - chunks * CHUNK_BLOCKS
                            parts = []
                            for o, acc, tacc in zip(outs, accs, taccs):
                                if full:
                                    with T.serial(0, blocks) as kk:
                                        kb = first_block + kk
                                        if PREFETCH[0]:  # may point past the row, into the next rows
                                            prefetch(w[o, kb * LANES + PREFETCH[0] // 4], PREFETCH[1])
                                        if group >= BK or group == n_in:  # one group per block
                                            g0, pattern = tirx.floordiv(kb * BK, group), [0] * 4
                                        else:
                                            g0, pattern = kb * (BK // group), [k // group for k in full_k]
                                        words = w[o, tirx.Ramp(kb * LANES, 1, LANES)]
                                        vector_block(o, nb, acc, words, LANES, kb, g0, pattern)
                                if vtail:
                                    T.buffer_store(tacc, tirx.Broadcast(f32(0.0), tile * L), [tirx.Ramp(0, 1, tile * L)])
                                    g0 = min(k // group for k in tail_k)
                                    with T.If(last), T.Then():
                                        if paired_tail:
                                            paired_tail_block(o, nb, tacc, g0, [k // group - g0 for k in tail_k])
                                        else:
                                            vector_block(o, nb, tacc, w[o, tirx.Ramp(full * LANES, 1, L)], L, full,
                                                         g0, [k // group - g0 for k in tail_k])
                                for ni in range(tile):
                                    part = acc[tirx.Ramp(ni * LANES, 1, LANES)] if full else None
                                    if vtail:
                                        extra = tacc[tirx.Ramp(ni * L, 1, L)]
                                        if full and L < LANES:  # the tail's lanes onto the first L lanes
                                            extra = tirx.Shuffle([extra, tirx.Broadcast(f32(0.0), LANES - L)],
                                                                 list(range(L)) + [L] * (LANES - L))
                                        part = extra if part is None else part + extra
                                    parts.append(part)
                            width = LANES if full else L
                            sums = row_sums(parts, width) if full or vtail else [f32(0.0)] * (tile * OP)
                            for i, o in enumerate(outs):
                                for ni in range(tile):
                                    n = nb * tile + ni
                                    total = sums[i * tile + ni]
                                    if rest and not vtail:
                                        tail = scalar_tail(o, n * max(rest, 1))
                                        total = total + tirx.Select(last, tail, f32(0.0))
                                    T.buffer_store(ybuf, total, [n * OB + oi2 * OP + i])
                    with T.serial(0, batch) as n:
                        here = tirx.Ramp(ob * OB, 1, OB) if OB > 1 else ob
                        before = tirx.Select(first, tirx.Broadcast(f32(0.0), OB), y[n, here]) if OB > 1 else \
                            tirx.Select(first, f32(0.0), y[n, here])
                        T.buffer_store(y, before + ybuf[tirx.Ramp(n * OB, 1, OB) if OB > 1 else n], [n, here])

            if passes == 1:
                rows(0, full, tirx.const(True, "bool"), tirx.const(True, "bool"))
            else:  # one parallel launch per pass; y accumulates
                with T.serial(0, passes) as kc:
                    rows(kc * chunk, tirx.min(chunk, full - kc * chunk), kc == 0, kc == passes - 1)
    return ib.get()


"""Paged attention on NVIDIA GPUs: the KV write and the attention as two launches, with PagedAttentionSpec's arguments.

Semantics are PagedAttentionSpec's (bitsmith/codegen/paged_attention.py); this is another algorithm for them:

    launch 1, grid (rows, 2 x kv_heads), one warp per block: row r writes its k (or v) vector of kv head kh
        into the pool, unless a later row writes the same slot (rows run in parallel here; "later rows
        win" as in the serial CPU kernel). int8: scale = max|x| / 127 (a cross-thread max), codes
        rint(x / scale), both with correctly rounded division (bit-equal to the CPU kernel's). int4: the
        cross-thread min and max, step = (max - min) / 15, one thread per byte of two codes.
    launch 2, grid (rows, kv_heads), NT threads per block, the group's G query heads together: online
        softmax over tiles of NT positions [lo, p]: one position per thread for the scores (its key
        read once for the G heads, q pre-scaled by scale * log2 e), a cross-thread max and sum per
        head, then the values with threads over (head, feature) pairs; accumulators in shared memory.

The IR is written once with every thread-parallel step as its own loop over the block's threads
("phases"; state that outlives a phase lives in shared memory, cross-thread sums are reduction blocks).
With `threads=False` those loops are serial loops and the function runs on a CPU: the same algorithm,
step for step, which is what the tests check against numpy. With `threads=True` they are bound to
threadIdx.x; TVM inserts the barriers between phases and lowers the reduction blocks to warp shuffles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitsmith.codegen.common import fconst
from bitsmith.codegen.gpu.phases import Loops, reduce_threads
from bitsmith.codegen.kv_pool import INT4_MAX, INT8_MAX, pool_buffers
from bitsmith.codegen.spec_checks import refuse

NT = 128  # threads (and positions per tile) of an attention block
WARP = 32  # threads of a KV-write block
SHARED_BYTES = 48 << 10  # static shared memory per block
VEC = 4  # key/value elements per vector load


def paged_attention_func(spec: Any, threads: bool) -> Any:
    """The PrimFunc (arguments as `spec.arg_names`), GPU-bound when `threads`, else its serial rendition."""
    _check(spec)
    loops = Loops(threads)
    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            args = _arguments(spec)
            with T.sblock("root"):
                _write_kernel(spec, loops, args)
                _attention_kernel(spec, loops, args)
    return ib.get()


def _check(spec: Any) -> None:
    shared = 4 * (2 * _pairs(spec) * NT + spec.group * NT + 4 * spec.group + NT)
    problems = [f"{spec.name}: {spec.group} query heads per kv head (at most {NT})"] if spec.group > NT else []
    if shared > SHARED_BYTES:
        problems.append(f"{spec.name}: {shared} bytes of shared memory per block (at most {SHARED_BYTES})")
    refuse(problems, "gpu paged attention", fix="use fewer query heads per kv head or a smaller head_dim")


def _arguments(spec: Any) -> dict[str, Any]:
    R, H, KV, D = spec.rows, spec.heads, spec.kv_heads, spec.head_dim
    pool, scales = pool_buffers(spec)
    shapes = {"q": ((R, H, D), "float32"), "k": ((R, KV, D), "float32"), "v": ((R, KV, D), "float32"),
              "positions": ((R,), "int64"), "block_tables": ((R, spec.table_blocks), "int32"),
              "cache": pool, "scales": (scales, "float32"), "out": ((R, H, D), "float32")}
    return {name: T.arg(name, T.buffer(*shapes[name])) for name in spec.arg_names}


def _entry(spec: Any, block: Any) -> Any:
    """The table entry of logical block `block`: itself, or its place in the ring of a windowed layer."""
    return block % spec.ring_blocks if spec.ring_blocks else block


def _target_slot(spec: Any, a: dict[str, Any], r: Any) -> tuple[Any, Any, Any]:
    """(valid, physical block, slot) where row r writes: valid when its position and table entry are."""
    ctx = spec.max_blocks * spec.block_size
    pos = a["positions"][r]
    in_range = tirx.all(pos >= tirx.const(0, "int64"), pos < tirx.const(ctx, "int64"))
    p = tirx.Cast("int32", tirx.max(tirx.min(pos, tirx.const(ctx - 1, "int64")), tirx.const(0, "int64")))
    pb = a["block_tables"][r, _entry(spec, p // spec.block_size)]
    return tirx.all(in_range, pb >= 0, pb < spec.num_blocks), pb, p % spec.block_size


# ---------------------------------------------------------------------------------------------
# Launch 1: the KV write


def _write_kernel(spec: Any, loops: Loops, a: dict[str, Any]) -> None:
    KV = spec.kv_heads
    part = T.sblock_alloc_buffer((WARP,), "float32", scope="shared")
    found = T.sblock_alloc_buffer((1,), "float32", scope="shared")
    amax = T.sblock_alloc_buffer((1,), "float32", scope="shared")
    nmin = T.sblock_alloc_buffer((1,), "float32", scope="shared") if spec.kv_dtype == "int4" else None
    with loops.blocks(spec.rows, "x") as block:
        r = loops.last_first(block, spec.rows)  # later rows win by the check below, not by the order
        with loops.blocks(2 * KV, "y") as vec:
            half, kh = vec // KV, vec % KV

            def value(d: Any) -> Any:
                return tirx.Select(half == 0, a["k"][r, kh, d], a["v"][r, kh, d])

            _superseded(spec, loops, a, r, part, found)
            if spec.kv_dtype == "int8":
                _lane_max(spec, loops, lambda d: tirx.abs(value(d)), part, amax, "amax")
            if spec.kv_dtype == "int4":  # amax: max x, nmin: -min x
                _lane_max(spec, loops, value, part, amax, "amax")
                _lane_max(spec, loops, lambda d: -value(d), part, nmin, "nmin")
                _store_int4(spec, loops, a, r, half, kh, value, found, amax, nmin)
            else:
                _store_vector(spec, loops, a, r, half, kh, value, found, amax)


def _superseded(spec: Any, loops: Loops, a: dict[str, Any], r: Any, part: Any, found: Any) -> None:
    """found[0] = 1 when a later row writes the same slot as row r, else 0."""
    R = spec.rows
    _, pb, slot = _target_slot(spec, a, r)
    with loops.threads(WARP) as t:
        flag = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(flag, fconst(0.0), [0])
        with T.serial(0, -(-max(R - 1, 1) // WARP)) as i:
            later = r + 1 + i * WARP + t
            valid2, pb2, slot2 = _target_slot(spec, a, tirx.min(later, R - 1))
            same = tirx.all(later < R, valid2, pb2 == pb, slot2 == slot)
            T.buffer_store(flag, tirx.Select(same, fconst(1.0), flag[0]), [0])
        T.buffer_store(part, flag[0], [t])
    reduce_threads("superseded", "max", part, found, 1, WARP, loops)


def _lane_max(spec: Any, loops: Loops, magnitude: Any, part: Any, amax: Any, name: str) -> None:
    """amax[0] = max over d < head_dim of magnitude(d), each lane first over its strided share."""
    with loops.threads(WARP) as t:
        m = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(m, tirx.min_value("float32"), [0])
        with T.serial(0, -(-spec.head_dim // WARP)) as i:
            T.buffer_store(m, tirx.max(m[0], magnitude(tirx.min(i * WARP + t, spec.head_dim - 1))), [0])
        T.buffer_store(part, m[0], [t])
    reduce_threads(name, "max", part, amax, 1, WARP, loops)


def _store_vector(spec: Any, loops: Loops, a: dict[str, Any], r: Any, half: Any, kh: Any,
                  value: Any, found: Any, amax: Any) -> None:
    """The vector into its slot in the pool's dtype (int8: codes and scale), when row r's slot is valid and
    not superseded; every thread runs this phase, only the stores are guarded (see phases.py)."""
    quant = spec.kv_dtype == "int8"
    valid, pb, slot = _target_slot(spec, a, r)
    with loops.threads(WARP) as t:
        write = T.alloc_buffer((1,), "float32", scope="local")  # 1: this block writes its vector
        T.buffer_store(write, tirx.Select(valid, fconst(1.0) - found[0], fconst(0.0)), [0])
        scale = None
        if quant:
            held = T.alloc_buffer((1,), "float32", scope="local")
            T.buffer_store(held, loops.div(amax[0], fconst(float(INT8_MAX))), [0])
            T.buffer_store(held, _nonzero(held[0]), [0])
            scale = held[0]
            with T.If(tirx.all(t == 0, write[0] > fconst(0.0))):
                with T.Then():
                    T.buffer_store(a["scales"], scale, [pb, half, slot, kh])
        with T.serial(0, -(-spec.head_dim // WARP)) as i:
            d = i * WARP + t
            with T.If(tirx.all(d < spec.head_dim, write[0] > fconst(0.0))):
                with T.Then():
                    stored = _int8_code(loops, value(d), scale) if quant else tirx.Cast(spec.kv_dtype, value(d))
                    T.buffer_store(a["cache"], stored, [pb, half, slot, kh, d])


def _store_int4(spec: Any, loops: Loops, a: dict[str, Any], r: Any, half: Any, kh: Any,
                value: Any, found: Any, amax: Any, nmin: Any) -> None:
    """The vector as int4 codes, two a byte (element 2j in the low nibble), with its (step, min), when row
    r's slot is valid and not superseded (as `_store_vector`)."""
    valid, pb, slot = _target_slot(spec, a, r)
    with loops.threads(WARP) as t:
        write = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(write, tirx.Select(valid, fconst(1.0) - found[0], fconst(0.0)), [0])
        held = T.alloc_buffer((2,), "float32", scope="local")  # step, min
        T.buffer_store(held, -nmin[0], [1])
        T.buffer_store(held, _nonzero(loops.div(amax[0] - held[1], fconst(float(INT4_MAX)))), [0])
        with T.If(tirx.all(t == 0, write[0] > fconst(0.0))):
            with T.Then():
                T.buffer_store(a["scales"], held[0], [pb, half, slot, kh, 0])
                T.buffer_store(a["scales"], held[1], [pb, half, slot, kh, 1])
        with T.serial(0, -(-spec.head_dim // (2 * WARP))) as i:
            j = i * WARP + t
            with T.If(tirx.all(j < spec.head_dim // 2, write[0] > fconst(0.0))):
                with T.Then():
                    low = _int4_code(loops, value(2 * j), held[1], held[0])
                    high = _int4_code(loops, value(2 * j + 1), held[1], held[0])
                    T.buffer_store(a["cache"], low | (high << tirx.const(4, "uint8")), [pb, half, slot, kh, j])


def _int4_code(loops: Loops, x: Any, low: Any, step: Any) -> Any:
    code = tirx.nearbyint(loops.div(x - low, step))  # round half to even, as numpy's rint
    return tirx.Cast("uint8", tirx.max(tirx.min(code, fconst(float(INT4_MAX))), fconst(0.0)))


def _int4_element(a: dict[str, Any], pb: Any, half: int, slot: Any, kh: Any, d: Any) -> Any:
    """Element d of the int4 key (half 0) or value (half 1) at (pb, slot, kh): min + code * step."""
    code = (a["cache"][pb, half, slot, kh, d // 2] >> tirx.Cast("uint8", d % 2 * 4)) & tirx.const(15, "uint8")
    return a["scales"][pb, half, slot, kh, 1] + tirx.Cast("float32", code) * a["scales"][pb, half, slot, kh, 0]


def _nonzero(scale: Any) -> Any:
    """An int8 scale of 0 (an all-zero vector) is stored as 1."""
    return tirx.Select(scale > fconst(0.0), scale, fconst(1.0))


def _int8_code(loops: Loops, x: Any, scale: Any) -> Any:
    code = tirx.nearbyint(loops.div(x, scale))  # round half to even, as numpy's rint
    return tirx.Cast("int8", tirx.max(tirx.min(code, fconst(float(INT8_MAX))), fconst(-float(INT8_MAX))))


# ---------------------------------------------------------------------------------------------
# Launch 2: attention


@dataclass(frozen=True)
class _Shared:
    """Block state between phases: queries, accumulators [G * D, padded to whole thread rounds]; scores and
    probabilities [G * NT]; per head running max, running sum, rescale factor and a reduction result [G];
    a per-thread scratch [NT]."""

    qs: Any
    acc: Any
    sc: Any
    red: Any
    m: Any
    l: Any
    corr: Any
    flag: Any


def _attention_kernel(spec: Any, loops: Loops, a: dict[str, Any]) -> None:
    G, BS = spec.group, spec.block_size
    ctx = spec.max_blocks * BS
    f32 = "float32"
    padded = _pairs(spec) * NT
    s = _Shared(*(T.sblock_alloc_buffer((n,), f32, scope="shared")
                  for n in (padded, padded, G * NT, G, G, G, G, NT)))
    with loops.blocks(spec.rows, "x") as r:
        with loops.blocks(spec.kv_heads, "y") as kh:
            pos = a["positions"][r]
            in_range = tirx.all(pos >= tirx.const(0, "int64"), pos < tirx.const(ctx, "int64"))
            p = T.bind(tirx.Cast("int32", tirx.max(tirx.min(pos, tirx.const(ctx - 1, "int64")),
                                                    tirx.const(0, "int64"))))
            lo = T.bind(tirx.max(p - (spec.sliding_window - 1), 0) if spec.sliding_window else tirx.const(0, "int32"))
            _check_blocks(spec, loops, a, s, r, p, lo)
            # tiles to attend: none for a padding row or a bad table (barriers cannot sit inside a branch,
            # so such rows run every phase with empty loops and store zeros)
            bad = T.alloc_buffer((1,), "float32", scope="local")
            T.buffer_store(bad, s.red[0], [0])  # (in a register: no shared load in a condition)
            tiles = T.alloc_buffer((1,), "int32", scope="local")
            T.buffer_store(tiles, tirx.Select(tirx.all(in_range, bad[0] == fconst(0.0)), (p - lo) // NT + 1, 0), [0])
            _attend(spec, loops, a, s, r, kh, p, lo, tiles[0])


def _pairs(spec: Any) -> int:
    """(head, feature) pairs per thread."""
    return -(-spec.group * spec.head_dim // NT)


def _check_blocks(spec: Any, loops: Loops, a: dict[str, Any], s: _Shared, r: Any, p: Any,
                  lo: Any) -> None:
    """s.red[0] = 1 when a table entry of a block holding a visible position is outside the pool, else 0."""
    first, count = lo // spec.block_size, p // spec.block_size - lo // spec.block_size + 1
    with loops.threads(NT) as t:
        bad = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(bad, fconst(0.0), [0])
        with T.serial(0, -(-spec.max_blocks // NT)) as i:
            b = i * NT + t
            entry = a["block_tables"][r, _entry(spec, tirx.min(first + b, spec.max_blocks - 1))]
            outside = tirx.all(b < count, tirx.any(entry < 0, entry >= spec.num_blocks))
            T.buffer_store(bad, tirx.Select(outside, fconst(1.0), bad[0]), [0])
        T.buffer_store(s.flag, bad[0], [t])
    reduce_threads("bad_blocks", "max", s.flag, s.red, 1, NT, loops)


def _attend(spec: Any, loops: Loops, a: dict[str, Any], s: _Shared, r: Any, kh: Any, p: Any,
            lo: Any, tiles: Any) -> None:
    G, D = spec.group, spec.head_dim
    qscale = fconst(float(spec.scale) * math.log2(math.e))
    pairs = _pairs(spec)
    with loops.threads(NT) as t:
        # no bounds test on the pairs (a branch would trap the barriers TVM puts in these loops): the
        # padding pairs past G * D compute on clamped indices and are never stored
        with T.serial(0, pairs) as i:
            idx = i * NT + t
            head = tirx.min(idx // D, G - 1)
            T.buffer_store(s.qs, a["q"][r, kh * G + head, idx % D] * qscale, [idx])
            T.buffer_store(s.acc, fconst(0.0), [idx])
        with T.If(t < G):
            with T.Then():
                T.buffer_store(s.m, tirx.min_value("float32"), [t])
                T.buffer_store(s.l, fconst(0.0), [t])
    with T.serial(0, tiles) as tile:
        start = T.bind(lo + tile * NT)
        count = T.bind(tirx.min(p - start + 1, NT))
        _scores(spec, loops, a, s, r, kh, start, count)
        _softmax_step(spec, loops, s, count)
        _accumulate(spec, loops, a, s, r, kh, start, count)
    with loops.threads(NT) as t:
        with T.serial(0, pairs) as i:
            idx = i * NT + t
            with T.If(idx < G * D):
                with T.Then():
                    result = tirx.Select(tiles > 0, s.acc[idx] / s.l[idx // D], fconst(0.0))
                    T.buffer_store(a["out"], result, [r, kh * G + idx // D, idx % D])


def _pool_index(spec: Any, a: dict[str, Any], r: Any, position: Any) -> tuple[Any, Any]:
    """(physical block, slot) of a visible position of row r (its table entry was checked)."""
    return a["block_tables"][r, _entry(spec, position // spec.block_size)], position % spec.block_size


def _scores(spec: Any, loops: Loops, a: dict[str, Any], s: _Shared, r: Any, kh: Any, start: Any,
            count: Any) -> None:
    """s.sc[g, j] = log2-domain score of position start + j for each head g (lowest float past count)."""
    G, D = spec.group, spec.head_dim
    vec = VEC if D % VEC == 0 else 1
    with loops.threads(NT) as t:
        dots = T.alloc_buffer((G,), "float32", scope="local")
        kv = T.alloc_buffer((vec,), pool_buffers(spec)[0][1], scope="local")  # (unused for int4)
        with T.If(t < count):
            with T.Then():
                pb, slot = _pool_index(spec, a, r, start + t)
                pb = T.bind(pb)
                with T.unroll(0, G) as g:
                    T.buffer_store(dots, fconst(0.0), [g])
                if spec.kv_dtype == "int4":
                    _int4_key_dots(spec, a, s, dots, pb, slot, kh)
                else:
                    with T.serial(0, D // vec) as d0:
                        with (T.vectorized(0, vec) if vec > 1 else T.serial(0, 1)) as v:
                            T.buffer_store(kv, a["cache"][pb, 0, slot, kh, d0 * vec + v], [v])
                        with T.unroll(0, vec) as v:
                            with T.unroll(0, G) as g:
                                key = tirx.Cast("float32", kv[v]) if spec.kv_dtype != "float32" else kv[v]
                                T.buffer_store(dots, dots[g] + s.qs[g * D + d0 * vec + v] * key, [g])
                kscale = a["scales"][pb, 0, slot, kh] if spec.kv_dtype == "int8" else None
                cap = float(spec.softcap or 0) * math.log2(math.e)  # log2 domain: scale and log2 e cancel in s / cap
                with T.unroll(0, G) as g:
                    score = dots[g] if kscale is None else dots[g] * kscale
                    if cap:
                        score = fconst(cap) * tirx.tanh(score * fconst(1.0 / cap))
                    T.buffer_store(s.sc, score, [g * NT + t])
            with T.Else():
                with T.unroll(0, G) as g:
                    T.buffer_store(s.sc, tirx.min_value("float32"), [g * NT + t])


def _int4_key_dots(spec: Any, a: dict[str, Any], s: Any, dots: Any, pb: Any, slot: Any, kh: Any) -> None:
    """dots[g] += q[g] . key at (pb, slot, kh) for an int4 pool: a byte (two elements) at a time."""
    G, D = spec.group, spec.head_dim
    with T.serial(0, D // 2) as j:
        for e in range(2):
            key = _int4_element(a, pb, 0, slot, kh, 2 * j + e)
            with T.unroll(0, G) as g:
                T.buffer_store(dots, dots[g] + s.qs[g * D + 2 * j + e] * key, [g])


def _softmax_step(spec: Any, loops: Loops, s: _Shared, count: Any) -> None:
    """Raise each head's running max to the tile's, rescale its running sum (the accumulators follow in
    `_accumulate` with s.corr), turn the scores into probabilities and add their sum."""
    G = spec.group
    reduce_threads("tile_max", "max", s.sc, s.red, G, NT, loops)
    if G == 1:
        # one head: `t < 1` lets TVM rewrite m[t] as m[0], and ThreadSync then wants a barrier between
        # reading and writing m inside the branch (refused); as two phases the barrier falls between them
        with loops.threads(NT) as t:
            with T.If(t < G):
                with T.Then():
                    T.buffer_store(s.corr, tirx.exp2(s.m[t] - tirx.max(s.m[t], s.red[t])), [t])
        with loops.threads(NT) as t:
            with T.If(t < G):
                with T.Then():
                    T.buffer_store(s.m, tirx.max(s.m[t], s.red[t]), [t])
    else:
        with loops.threads(NT) as t:
            with T.If(t < G):
                with T.Then():
                    new = T.alloc_buffer((1,), "float32", scope="local")
                    T.buffer_store(new, tirx.max(s.m[t], s.red[t]), [0])
                    T.buffer_store(s.corr, tirx.exp2(s.m[t] - new[0]), [t])
                    T.buffer_store(s.m, new[0], [t])
    with loops.threads(NT) as t:
        with T.unroll(0, G) as g:
            prob = tirx.Select(t < count, tirx.exp2(s.sc[g * NT + t] - s.m[g]), fconst(0.0))
            T.buffer_store(s.sc, prob, [g * NT + t])
    reduce_threads("tile_sum", "sum", s.sc, s.red, G, NT, loops)
    with loops.threads(NT) as t:
        with T.If(t < G):
            with T.Then():
                T.buffer_store(s.l, s.l[t] * s.corr[t] + s.red[t], [t])


def _accumulate(spec: Any, loops: Loops, a: dict[str, Any], s: _Shared, r: Any, kh: Any,
                start: Any, count: Any) -> None:
    """acc[g, d] = acc[g, d] * corr[g] + sum_j p[g, j] * V[start + j, d], threads over (g, d) pairs."""
    G, D = spec.group, spec.head_dim
    with loops.threads(NT) as t:
        with T.serial(0, _pairs(spec)) as i:
            idx = i * NT + t
            g, d = tirx.min(idx // D, G - 1), idx % D  # (padding pairs: see `_attend`)
            total = T.alloc_buffer((1,), "float32", scope="local")
            T.buffer_store(total, s.acc[idx] * s.corr[g], [0])
            with T.serial(0, count) as j:
                pb, slot = _pool_index(spec, a, r, start + j)
                value = a["cache"][pb, 1, slot, kh, d] if spec.kv_dtype != "int4" else _int4_element(a, pb, 1, slot, kh, d)
                value = value if spec.kv_dtype in ("float32", "int4") else tirx.Cast("float32", value)
                if spec.kv_dtype == "int8":  # (the same scale in every thread: a broadcast load)
                    value = value * a["scales"][pb, 1, slot, kh]
                T.buffer_store(total, total[0] + s.sc[g * NT + j] * value, [0])
            T.buffer_store(s.acc, total[0], [idx])

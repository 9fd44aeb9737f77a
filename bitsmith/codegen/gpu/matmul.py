"""GEMV and GEMM (y = x @ dequant(W).T) on NVIDIA GPUs: a TE definition shaped for 16-byte loads, and its schedule.

Same arguments as the CPU kernels (GemvSpec, GemmSpec): x f32 [rows, in], W (uint32 packed codes, or fp32/fp16/
bf16 [out, in]), [group parameters: scales [out, groups], [zeros], [super_scales], [super_zeros]], y f32 [rows, out].

The definition splits K into "vectors" a thread loads at once, in the packed layout of
bitsmith.runtime.packed_layout (element k = kb*16*S + j*16 + l, word = kb*16*U + p*16 + l):

    quad kq = kb*4 + q:  lanes l = 4q .. 4q+3 of block kb, i.e. 4 consecutive words per unit word p (one
                         uint4 load for U = 1), holding S slots x 4 lanes = 4*S values
    dot[n, o, kq, j]  = sum_v x[n, k] * (2^b + q[o, k])     k = kb*16*S + j*16 + 4q + v (4 consecutive k)
    xsum[n, kq, j]    = sum_v x[n, k]                         shared by every output row
    main[n, o]        = sum_{kq, j} s[o, g] * dot - c[o, g] * xsum      (g: one group per slot row; s and the
                        correction c of every form (sym, asym, min, two-level): dequant.GroupParams)
    tail[n, o]        = the last partial block (L lanes, see runtime/packed_layout.py), element by element, masked
    y                 = main + tail

Codes decode as 2^b + q straight from their bits (dequant.unpack_code, biased), and the zero point and that bias
are one correction per 4 values from the activations' sum, so a value costs a shift, a mask and an FMA.
Dense weights: main[n, o] = sum_{kq, v} x[n, kq*V + v] * W[o, kq*V + v], V values per 16-byte load.
Rows whose word count is not a multiple of 4 (odd tails) and 3-bit lanes (3 words 16 apart) load words
one by one; rows of x whose length is not a multiple of 4 load x one value at a time.

Schedule (one CUDA block per R output rows x NB rows of x): TX threads split the vectors of a row
(vector kq = it*TX + tx), each keeps R x NB partial sums in registers, loads its weight vectors with one
16-byte load per row, then one cross-thread (warp shuffle) sum per output. GEMM is the same kernel with
the rows of x spread over blockIdx.y in chunks of NB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx
from tvm.s_tir import Schedule

from bitsmith.codegen.dequant import GroupParams, f32, unpack_code, weight_placeholder
from bitsmith.codegen.spec_checks import DENSE_BITS
from bitsmith.runtime.packed_layout import LANES, lane_unit

QUAD = 4  # lanes per thread vector: 4 uint32 words = one 16-byte load
MAX_ACCUMULATORS = 8  # R x NB partial sums per thread


@dataclass(frozen=True)
class MatmulShape:
    """What the definition and the schedule need from a GemvSpec or GemmSpec (rows = batch or rows)."""

    rows: int
    out_features: int
    in_features: int
    bits: int
    group: int  # values per scale group (in_features when per channel)
    n_groups: int
    sym: bool
    weight_shape: tuple[int, int]
    dense_dtype: str  # dense weights: float32, float16 or bfloat16
    offset: bool = False  # min form (PackedWeightLayout)
    super_group: int = 0  # two-level scales (PackedWeightLayout)
    params: tuple[tuple[str, tuple[int, int], str], ...] = ()  # PackedWeightLayout.param_specs()

    @property
    def is_quantized(self) -> bool:
        return self.bits not in DENSE_BITS

    @property
    def blocks(self) -> tuple[int, int, int]:
        """(full 16-lane blocks, values after them, lanes of the tail block) of a packed row."""
        _, slots = lane_unit(self.bits)
        full, rest = divmod(self.in_features, LANES * slots)
        return full, rest, -(-rest // slots)

    @property
    def dense_vector(self) -> int:
        """Dense weights: values per thread vector, 16 bytes when that divides a row (aligned loads)."""
        width = 16 // (self.bits // 8)
        while self.in_features % width:
            width //= 2
        return width

    @property
    def vectors(self) -> int:
        """Thread vectors per row (quads of the full blocks, or dense vectors)."""
        return self.blocks[0] * QUAD if self.is_quantized else self.in_features // self.dense_vector

    @property
    def threads(self) -> int:
        """TX, the threads that split a row's vectors: more for long rows keep more loads in flight."""
        vectors = max(self.vectors, 1)
        return 32 if vectors < 128 else (64 if vectors < 1024 else 128)

    def padded(self, extent: int) -> int:
        """`extent` rounded up to a multiple of TX. The reductions run over padded extents with the extra
        iterations masked in the definition: a split that does not divide leaves the predicate on the
        loads only, and the threads past the end would add stale registers (seen on an H100)."""
        return -(-extent // self.threads) * self.threads


def matmul_shape(spec: Any) -> MatmulShape:
    rows = spec.batch if hasattr(spec, "batch") else spec.rows
    params = tuple(spec.param_specs()) if spec.is_quantized else ()
    return MatmulShape(rows, spec.out_features, spec.in_features, spec.bits, spec.group, spec.n_groups, spec.sym,
                       spec.weight_shape(), spec.dense_dtype, spec.offset, spec.super_group, params)


# ---------------------------------------------------------------------------------------------
# Definition (TE)


def matmul_tensors(shape: MatmulShape) -> list[Any]:
    """The PrimFunc arguments: x, W, [group parameters], y."""
    x = te.placeholder((shape.rows, shape.in_features), "float32", name="x")
    if not shape.is_quantized:
        w = weight_placeholder(shape.weight_shape, shape.dense_dtype, "weight")
        main = _dense_main(shape, x, w)
        return [x, w, te.compute(main.shape, lambda n, o: main[n, o], name="y")]
    w = te.placeholder(shape.weight_shape, "uint32", name="qweight")
    tensors = [te.placeholder(dims, dtype, name=name) for name, dims, dtype in shape.params]
    gp = GroupParams.of(shape, tensors)
    full, rest, _ = shape.blocks
    parts = ([_quant_main(shape, x, w, gp)] if full else []) + ([_quant_tail(shape, x, w, gp)] if rest else [])

    def total(n: Any, o: Any) -> Any:
        return parts[0][n, o] if len(parts) == 1 else parts[0][n, o] + parts[1][n, o]

    y = te.compute((shape.rows, shape.out_features), total, name="y")
    return [x, w] + tensors + [y]


def _quant_main(shape: MatmulShape, x: Any, w: Any, gp: GroupParams) -> Any:
    units, slots = lane_unit(shape.bits)
    bias = float(1 << shape.bits)

    def k_of(kq: Any, j: Any, v: Any) -> Any:
        return kq // QUAD * LANES * slots + j * LANES + kq % QUAD * QUAD + v

    def group_of(kq: Any, j: Any) -> Any:  # a slot row (16 consecutive k) lies in one group
        return (kq // QUAD * LANES * slots + j * LANES) // shape.group

    n_out, n_vec, rows = shape.out_features, shape.vectors, shape.rows
    padded = shape.padded(n_vec)  # vectors kq >= n_vec read the last vector and are masked in `main`

    def last(kq: Any) -> Any:
        return kq if padded == n_vec else tirx.min(kq, n_vec - 1)

    v1, v2 = te.reduce_axis((0, QUAD), "v1"), te.reduce_axis((0, QUAD), "v2")
    xsum = te.compute((rows, padded, slots), lambda n, kq, j: te.sum(x[n, k_of(last(kq), j, v1)], axis=v1),
                      name="xsum")

    def dot_body(n: Any, o: Any, kq: Any, j: Any) -> Any:
        kq = last(kq)
        code = unpack_code(w, o, kq // QUAD * LANES * units, j, kq % QUAD * QUAD + v2, LANES, shape.bits,
                           biased=True)
        return te.sum(x[n, k_of(kq, j, v2)] * code, axis=v2)

    dot = te.compute((rows, n_out, padded, slots), dot_body, name="dot")
    kq, j = te.reduce_axis((0, padded), "kq"), te.reduce_axis((0, slots), "j")

    def main_body(n: Any, o: Any) -> Any:
        g = group_of(last(kq), j)
        sc = gp.scale(o, g)
        term = sc * dot[n, o, kq, j] - gp.correction(o, g, bias, sc) * xsum[n, kq, j]
        return te.sum(term if padded == n_vec else tirx.if_then_else(kq < n_vec, term, 0.0), axis=[kq, j])

    return te.compute((rows, n_out), main_body, name="main")


def _quant_tail(shape: MatmulShape, x: Any, w: Any, gp: GroupParams) -> Any:
    """The last block of L lanes (k = base + j*L + l), padding values masked out."""
    units, slots = lane_unit(shape.bits)
    full, rest, tail_lanes = shape.blocks
    base, wbase, n_in = full * LANES * slots, full * LANES * units, shape.in_features
    size = slots * tail_lanes
    t = te.reduce_axis((0, shape.padded(size)), "t")  # see MatmulShape.padded

    def body(n: Any, o: Any) -> Any:
        tt = tirx.min(t, size - 1)
        j, lane = tt // tail_lanes, tt % tail_lanes
        k = base + t
        g = tirx.min(k, n_in - 1) // shape.group
        sc = gp.scale(o, g)
        value = unpack_code(w, o, wbase, j, lane, tail_lanes, shape.bits) * sc - gp.correction(o, g, 0.0, sc)
        term = x[n, tirx.min(k, n_in - 1)] * value
        # te.sum's `where` is dropped by create_prim_func: mask the padding slots explicitly
        return te.sum(term if rest == shape.padded(size) else tirx.if_then_else(k < n_in, term, 0.0), axis=t)

    return te.compute((shape.rows, shape.out_features), body, name="tail")


def _dense_main(shape: MatmulShape, x: Any, w: Any) -> Any:
    width, n_vec = shape.dense_vector, shape.vectors
    padded = shape.padded(n_vec)  # see MatmulShape.padded
    kq, v = te.reduce_axis((0, padded), "kq"), te.reduce_axis((0, width), "v")

    def body(n: Any, o: Any) -> Any:
        k = (kq if padded == n_vec else tirx.min(kq, n_vec - 1)) * width + v
        term = x[n, k] * f32(w[o, k])
        return te.sum(term if padded == n_vec else tirx.if_then_else(kq < n_vec, term, 0.0), axis=[kq, v])

    return te.compute((shape.rows, shape.out_features), body, name="main")


def matmul_reference(spec: Any) -> Any:
    """The unscheduled PrimFunc of a GemvSpec or GemmSpec."""
    return te.create_prim_func(matmul_tensors(matmul_shape(spec))).with_attr("global_symbol", spec.name)


def matmul_func(spec: Any) -> Any:
    """The PrimFunc of a GemvSpec or GemmSpec scheduled for a GPU (see the module docstring)."""
    return schedule_matmul(matmul_reference(spec), matmul_shape(spec)).with_attr("global_symbol", spec.name)


# ---------------------------------------------------------------------------------------------
# Schedule


@dataclass(frozen=True)
class MatmulTiles:
    """How the schedule cuts the work."""

    tx: int  # threads splitting a row's vectors
    rows_per_block: int  # R output rows per CUDA block
    x_rows: int  # NB rows of x per CUDA block


def matmul_tiles(shape: MatmulShape) -> MatmulTiles:
    """TX from the vectors per row (MatmulShape.threads); NB a divisor of
    the rows of x (at most 8), R a divisor of out_features with R x NB <= MAX_ACCUMULATORS (at most 4)."""
    tx = shape.threads
    x_rows = max(d for d in range(1, min(shape.rows, MAX_ACCUMULATORS) + 1) if shape.rows % d == 0)
    r_max = min(4, MAX_ACCUMULATORS // x_rows)
    rows_per_block = max(d for d in range(1, r_max + 1) if shape.out_features % d == 0)
    return MatmulTiles(tx, rows_per_block, x_rows)


def schedule_matmul(func: Any, shape: MatmulShape) -> Any:
    """The GPU schedule described in the module docstring, on `matmul_reference`'s PrimFunc."""
    tiles = matmul_tiles(shape)
    sch = Schedule(func)
    y = sch.get_sblock("y")
    n, o = sch.get_loops(y)
    ny, ni = sch.split(n, [None, tiles.x_rows])
    bx, r = sch.split(o, [None, tiles.rows_per_block])
    sch.reorder(ny, bx, ni, r)
    sch.bind(ny, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    # the epilogue (R x NB outputs) runs in every thread: equal values to equal addresses, one store
    # per warp; binding it to threads would need TX outputs (threadIdx extents must agree in a kernel)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    for name in ("tail", "main"):  # each computed under blockIdx, before the epilogue
        if name in names:
            _schedule_reduction(sch, name, bx, shape, tiles)
    return sch.mod["main"]


def _schedule_reduction(sch: Any, name: str, bx: Any, shape: MatmulShape, tiles: MatmulTiles) -> None:
    """Split `name`'s first reduction axis over TX threads (rfactor), sum the partials across threads."""
    block = sch.get_sblock(name)
    _, _, first, *_ = sch.get_loops(block)  # n, o, then the reduction axes (vectors first)
    _, tx = sch.split(first, [None, tiles.tx])
    rf = sch.rfactor(tx, factor_axis=0)
    sch.set_scope(block, 0, "shared")  # the epilogue's threads read the sums
    sch.compute_at(block, bx, preserve_unit_loops=True)
    *_, threads, ni, r = sch.get_loops(block)
    sch.reorder(ni, r, threads)
    sch.bind(threads, "threadIdx.x")
    sch.compute_at(rf, bx, preserve_unit_loops=True)
    sch.set_scope(rf, 0, "local")
    _bind_partials(sch, rf, sch.get_loops(rf), name, shape)


def _bind_partials(sch: Any, rf: Any, loops: list[Any], name: str, shape: MatmulShape) -> None:
    """Per thread: loop over its vectors (it), the R x NB accumulators innermost, caches of W and x."""
    # loops of the rf block after compute_at: ny, bx, then its iters (tx, n, o, it, inner...)
    tx, n, o, it, *inner = loops[2:]
    sch.bind(tx, "threadIdx.x")
    if name == "tail":
        sch.reorder(it, n, o)
        sch.decompose_reduction(rf, it)
        return
    if shape.is_quantized:
        (j,) = inner
        sch.reorder(it, j, o, n)
        _quant_stages_at(sch, rf, it, j, shape)
        for loop in (j, o, n):
            sch.unroll(loop)
    else:
        (v,) = inner
        sch.reorder(it, o, n, v)
        _cache_vector(sch, rf, "weight", it, aligned=True)
        _cache_vector(sch, rf, "x", it, aligned=True)
        for loop in (o, n, v):
            sch.unroll(loop)
    sch.decompose_reduction(rf, it)


def _quant_stages_at(sch: Any, rf: Any, it: Any, j: Any, shape: MatmulShape) -> None:
    """dot and xsum per slot row inside the thread's loop, in registers; W words and x values cached."""
    units, _ = lane_unit(shape.bits)
    dot, xsum = sch.get_sblock("dot"), sch.get_sblock("xsum")
    sch.compute_at(dot, j, preserve_unit_loops=True)
    sch.compute_at(xsum, j, preserve_unit_loops=True)
    for block in (dot, xsum):
        sch.set_scope(block, 0, "local")
    words = shape.weight_shape[1]
    if units == 1:  # 3-bit lanes span 3 words 16 apart: no contiguous vector to cache
        _cache_vector(sch, dot, "qweight", it, aligned=words % QUAD == 0)
    _cache_vector(sch, dot, "x", j, aligned=shape.in_features % QUAD == 0, also=[xsum])
    for block in (dot, xsum):
        for loop in sch.get_loops(block)[-5:]:
            _unroll_if_serial(sch, loop)


def _cache_vector(sch: Any, block: Any, buffer: str, at: Any, aligned: bool, also: list[Any] | None = None) -> None:
    """Copy `block`'s reads of `buffer` under loop `at` into registers; one vector load per row when aligned."""
    cache = sch.cache_read(block, buffer, "local", consumer_blocks=[block] + (also or []))
    sch.compute_at(cache, at, preserve_unit_loops=True)
    *_, row, last = sch.get_loops(cache)
    sch.unroll(row)
    if aligned:
        sch.vectorize(last)
    else:
        sch.unroll(last)


def _unroll_if_serial(sch: Any, loop: Any) -> None:
    if sch.get(loop).kind == tirx.ForKind.SERIAL:
        sch.unroll(loop)

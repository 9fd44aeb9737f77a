"""Fused dequantize + GEMM kernels for prefill (y = x @ dequant(W).T for many rows of x) on CPUs; on a GPU the
spec builds gpu/matmul.py's kernel.

Same arguments as GemvSpec: x f32 [rows, in], W (uint32 packed codes, or fp32/fp16/bf16 dense [out, in]),
[scales [out, groups], [zeros [out, groups]], [super_scales, [super_zeros]]], y f32 [rows, out] (the group
parameters of PackedWeightLayout.param_specs). Written as TIR loops with
the IRBuilder (not TE + schedule), so the loop nest is exactly (V = vector lanes, 16 with AVX-512):

    xt[rb, k, l] = x[rb*V + l, k]                 once per call (rows past `rows` are zero)
    parallel over tiles of NR output rows:        (NR = 24 with 32 vector registers)
        acc[rb, i, :] = 0
        for each K slab (SLAB values):
            wd[i, kk] = dequant(W)[o_i, k0 + kk]  the slab of the tile's rows, once, in fp32 (vector
                                                  along the packed layout's 16 k-lanes); prefetches
                                                  the same slab of the next tile meanwhile
            for each block rb of V rows:
                for kk:  acc[rb, i, :] += broadcast(wd[i, kk]) * xt[rb, k0 + kk, :]   (i < NR unrolled)
        y[rb*V + l, o_i] = acc[rb, i, l]

The register block is vectorized along the rows of x: each K step is one load of x and NR FMAs with a
broadcast memory operand (vfmadd231ps m32{1to16}), no horizontal sums and no shuffles; LLVM keeps the
NR accumulators in registers across the slab. Output rows are padded to a multiple of NR (padding rows
re-read the last row of W and are never stored), so every tile runs the same unpredicated block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitsmith.codegen.dequant import GroupParams, f32, unpack_code
from bitsmith.codegen.gemv import PackedWeightLayout
from bitsmith.codegen.gpu.matmul import matmul_func, matmul_reference
from bitsmith.codegen.spec_checks import refuse
from bitsmith.codegen.target import Target
from bitsmith.codegen.vnni_ir import prefetch
from bitsmith.runtime.kernel_dtypes import kernel_dtype
from bitsmith.runtime.packed_layout import LANES, lane_unit

MAX_ROWS = 128  # rows of x per call (any count: the last row vector is zero-padded)
SLAB = 256  # K values dequantized at a time (at least one packed block): slab + x slab stay in L1
# dense fp16/fp32 rows: half the slab (faster with weights from DRAM; the wider slab is as fast in cache)
DENSE_SLAB = 128
# software-prefetch the next tile's weights while dequantizing (faster with weights from DRAM, see
# bench/kernels.md). Not inside the K loop: there LLVM stores the accumulators every step (a call it
# cannot see through), which is much slower.
PREFETCH = True


@dataclass(frozen=True)
class GemmSpec(PackedWeightLayout):
    """One kernel: y[rows, out] = x[rows, in] @ W.T, W packed `bits`-bit codes or dense fp32/fp16/bf16."""

    out_features: int
    in_features: int
    bits: int
    group_size: int = -1
    sym: bool = True
    rows: int = 16
    bf16: bool = False  # bits 16: the dense weights are bfloat16 (carried as uint16, see runtime/kernel_dtypes.py)
    offset: bool = False  # min form (see PackedWeightLayout)
    super_group: int = 0  # 256: two-level scales (see PackedWeightLayout)

    def __post_init__(self) -> None:
        rows = [] if 1 <= self.rows <= MAX_ROWS else [f"rows {self.rows} (use 1..{MAX_ROWS})"]
        refuse(self.layout_problems(rows), "GEMM")

    @property
    def name(self) -> str:
        shape = f"n{self.out_features}_k{self.in_features}_r{self.rows}"
        return f"{'q' if self.is_quantized else ''}gemm_{self.scheme_tag()}_{shape}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, W, [group parameters], y."""
        return matmul_func(self) if target.is_gpu else _gemm_func(self, target)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/matmul.py); built for a CPU it checks the GPU semantics."""
        return matmul_reference(self)

    def flops(self) -> int:
        return 2 * self.rows * self.out_features * self.in_features


def tile_rows(n_out: int, target: Target) -> int:
    """NR, the output rows of a tile and of the register block (NR vector accumulators, one per row).

    3/4 of the vector registers (32 with AVX-512 or NEON, else 16); shrunk to a divisor of n_out when
    one is close (no padding rows) and to n_out when smaller. On one AVX-512 core one 16-row vector x 24
    output rows matched 2 x 12 and 3 x 8 in the bare micro-kernel and beat 4 x 6 at 64 rows (fewer tiles:
    x is streamed once per tile; bench/kernels.md).
    """
    regs = 32 if target.vector_bytes == 64 or target.arch == "aarch64" else 16
    widest = regs * 3 // 4
    if n_out <= widest:
        return n_out
    for cand in range(widest, (3 * widest) // 4 - 1, -1):  # a divisor within 25%
        if n_out % cand == 0:
            return cand
    return widest


# ---------------------------------------------------------------------------------------------
# TIR


def _slabs(spec: GemmSpec) -> tuple[int, int, int, int, int, int]:
    """(unit, rest, blocks per slab, uniform slabs, blocks of the last slab, tail width) of K.

    K is cut into blocks of `unit` values (a packed block of 16 lanes x S slots, or 16 dense values)
    and `rest` values after them; slabs of ~SLAB values are dequantized one at a time so that the
    tile's fp32 slab and x's slab stay in L1. The last slab takes the remaining blocks and the rest
    (the tail width counts the packed tail block's padding values too).
    """
    if spec.is_quantized:
        _, slots = lane_unit(spec.bits)
        unit = LANES * slots
        tail_width = slots * -(-(spec.in_features % unit) // slots)
    else:
        unit = LANES
        tail_width = spec.in_features % unit
    full, rest = divmod(spec.in_features, unit)
    per_slab = max(1, (SLAB if spec.is_quantized else DENSE_SLAB) // unit)
    return unit, rest, per_slab, full // per_slab, full % per_slab, tail_width


def _gemm_func(spec: GemmSpec, target: Target) -> Any:
    n_out, n_in, rows = spec.out_features, spec.in_features, spec.rows
    nr, rt = tile_rows(n_out, target), target.lanes(4)  # register block: nr output rows x one vector of rows
    n_rb, n_tiles = -(-rows // rt), -(-n_out // nr)
    unit, rest, per_slab, n_uniform, last_blocks, tail_width = _slabs(spec)
    widest = max(per_slab * unit if n_uniform else 0, last_blocks * unit + tail_width)
    line = 16  # fp32 values per 64-byte cache line
    stride = (-(-widest // line) | 1) * line  # an odd number of lines: the nr rows spread over L1 sets
    fp32 = "float32"

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x = T.arg("x", T.buffer((rows, n_in), fp32))
            if spec.is_quantized:
                w = T.arg("qweight", T.buffer(spec.weight_shape(), "uint32"))
                gp = GroupParams.of(spec, [T.arg(name, T.buffer(shape, dtype))
                                           for name, shape, dtype in spec.param_specs()])
            else:
                w = T.arg("weight", T.buffer((n_out, n_in), kernel_dtype(spec.dense_dtype)))
                gp = None
            y = T.arg("y", T.buffer((rows, n_out), fp32))

            # x transposed into row blocks: xt[rb, k, r] (r: the block's rt rows, zero past `rows`)
            xt = T.alloc_buffer((n_rb, n_in, rt), fp32)
            with T.parallel(0, n_rb * n_in) as rk:
                rb, k = rk // n_in, rk % n_in
                with T.vectorized(0, rt) as r:
                    row = rb * rt + r
                    value = x[tirx.min(row, rows - 1), k]
                    T.buffer_store(xt, value if rows % rt == 0 else tirx.if_then_else(row < rows, value, 0.0),
                                   [rb, k, r])

            with T.parallel(0, n_tiles) as t:
                # flat, with a padded row stride (a 2-D buffer's unused columns are compacted away)
                wd = T.alloc_buffer((nr * stride,), fp32)
                acc = T.alloc_buffer((n_rb, nr, rt), fp32, scope="local")
                with T.serial(0, n_rb) as rb:
                    with T.unroll(0, nr) as i:
                        with T.vectorized(0, rt) as r:
                            T.buffer_store(acc, tirx.const(0.0, fp32), [rb, i, r])

                def slab(kb0: Any, blocks: int, tail: bool) -> None:
                    k0 = kb0 * unit
                    with T.serial(0, nr) as i:
                        o = tirx.min(t * nr + i, n_out - 1)
                        # the same row of the next tile: its weights are prefetched while this one
                        # is dequantized, a whole tile of FMAs ahead of their use
                        nxt = tirx.min(t * nr + i + nr, n_out - 1) if PREFETCH else None
                        if spec.is_quantized:
                            _emit_dequant(spec, wd, i * stride, o, nxt, w, gp, kb0, blocks, tail)
                        else:
                            _emit_convert(n_in, wd, i * stride, o, nxt, w, k0, blocks, tail)
                    with T.serial(0, n_rb) as rb:
                        with T.serial(0, blocks * unit + (rest if tail else 0)) as kk:
                            with T.unroll(0, nr) as i:
                                with T.vectorized(0, rt) as r:
                                    T.buffer_store(acc, acc[rb, i, r] + wd[i * stride + kk] * xt[rb, k0 + kk, r],
                                                   [rb, i, r])

                if n_uniform:
                    with T.serial(0, n_uniform) as c:
                        slab(c * per_slab, per_slab, False)
                if last_blocks or rest:
                    slab(n_uniform * per_slab, last_blocks, rest > 0)
                with T.serial(0, n_rb) as rb:
                    with T.unroll(0, nr) as i:
                        with T.serial(0, rt) as r:
                            o, row = t * nr + i, rb * rt + r
                            conds = ([o < n_out] if n_out % nr else []) + ([row < rows] if rows % rt else [])
                            if not conds:
                                T.buffer_store(y, acc[rb, i, r], [row, o])
                            else:
                                with T.If(tirx.all(*conds) if len(conds) > 1 else conds[0]):
                                    with T.Then():
                                        T.buffer_store(y, acc[rb, i, r], [row, o])
    return ib.get()


def _emit_convert(n_in: int, wd: Any, row0: Any, o: Any, nxt: Any, w: Any, k0: Any, blocks: int,
                  tail: bool) -> None:
    """wd[row0 + kk] = float32(W[o, k0 + kk]) for a slab: 16 at a time, then the last K % 16 one by one."""
    if blocks:
        with T.serial(0, blocks) as kb:
            if nxt is not None:
                prefetch(w[nxt, k0 + kb * LANES])
            with T.vectorized(0, LANES) as l:
                T.buffer_store(wd, f32(w[o, k0 + kb * LANES + l]), [row0 + kb * LANES + l])
    if tail:
        with T.serial(blocks * LANES, blocks * LANES + n_in % LANES) as kk:
            T.buffer_store(wd, f32(w[o, k0 + kk]), [row0 + kk])


def _emit_dequant(spec: GemmSpec, wd: Any, row0: Any, o: Any, nxt: Any, w: Any, gp: GroupParams, kb0: Any,
                  blocks: int, tail: bool) -> None:
    """wd[row0 + kk] = w[o, k] for the slab's k = kb0 * unit + kk, vector along the packed layout's 16 lanes.

    Codes decode as 2^b + q (see `dequant.unpack_code`), so w = (2^b + q) * s - c is one FMA with a per-group
    addend (c: dequant.GroupParams.correction, e.g. (2^b + z) * s). In full blocks a group covers whole slot
    rows: scale and addend are broadcasts.
    The tail block (L lanes) writes its padding values too (zero codes, finite; never read).
    """
    bits, n_in, group, n_groups = spec.bits, spec.in_features, spec.group, spec.n_groups
    units, slots = lane_unit(bits)
    unit = LANES * slots
    bias = float(1 << bits)

    def scale_and_addend(g: Any) -> tuple[Any, Any]:
        g = tirx.min(g, n_groups - 1)
        sc = gp.scale(o, g)
        return sc, -gp.correction(o, g, bias, sc)

    if blocks:
        with T.serial(0, blocks) as kb:
            if nxt is not None:  # the block's U lines of codes and its first scale (and zero)
                for p in range(units):
                    prefetch(w[nxt, ((kb0 + kb) * units + p) * LANES])
                for buf in (gp.scales, gp.zeros) if gp.zeros is not None else (gp.scales,):
                    prefetch(buf[nxt, tirx.min((kb0 + kb) * unit // group, n_groups - 1)])
            with T.unroll(0, slots) as j:
                local = kb * unit + j * LANES
                sc, addend = scale_and_addend((kb0 * unit + local) // group)
                with T.vectorized(0, LANES) as l:
                    code = unpack_code(w, o, (kb0 + kb) * LANES * units, j, l, LANES, bits, True)
                    T.buffer_store(wd, code * sc + addend, [row0 + local + l])
    if tail:
        full, rest = divmod(n_in, unit)
        tail_lanes = -(-rest // slots)
        base, wbase = full * unit, full * LANES * units
        # a slot row lies in one group when L divides the group and the tail's start (no lane term)
        row_in_group = group % tail_lanes == 0 and base % tail_lanes == 0
        with T.unroll(0, slots) as j:
            k0 = base + j * tail_lanes
            if row_in_group:
                sc, addend = scale_and_addend(k0 // group)
            with T.vectorized(0, tail_lanes) as l:
                if not row_in_group:
                    sc, addend = scale_and_addend(tirx.min(k0 + l, n_in - 1) // group)
                code = unpack_code(w, o, wbase, j, l, tail_lanes, bits, True)
                T.buffer_store(wd, code * sc + addend, [row0 + blocks * unit + j * tail_lanes + l])

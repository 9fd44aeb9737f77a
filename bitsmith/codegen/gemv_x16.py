"""Quantized matmul with int8 activations on weights interleaved 16 output rows per vector (AVX-512 VNNI).

The packed layout (`bitsmith.runtime.interleave`) puts, per group of 16 output rows and per 32 input
values, the codes of those 16 rows side by side: byte 4 o + t of a 64-byte vector is row o's code of
input k = 4 c + t (vector c; int4: c = 2 v + plane, the low nibbles of vector v are c = 2 v, the high
ones c = 2 v + 1). One `vpdpbusd` of a code vector with the 4 activation bytes k = 4 c .. 4 c + 3
broadcast to every lane adds 4 products to each of the 16 rows' sums:

    x quantized per 32 values:  xq[n, k] = rint(x * 127 / max|x|),  sx[n, b] = max|x| / 127
    per 16 rows (o), batch row n, 32-block b:  dot = sum_c vpdpbusd(codes[c], broadcast(xq[n, 32 b + 4 c]))
    acc[n, o] += sx[n, b] * s[o, g(b)] * (dot - z[o, g(b)] * sum_k xq[n, 32 b + k])   (sym: z = 2^(bits-1))

so a row's sum never leaves its lane: no horizontal sums, no transposes, the unpack is a mask and a
shift, y is stored 16 outputs at a time. Against the lane-per-k layout of gemv_int8.py (chunks,
pairing-tree sums) it is faster at 16 rows, from DRAM and in cache, and equal at 1 row (bench/serve.md).
Needs out % 16 == 0, in % 32 == 0 and groups of a multiple of 32 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitsmith.codegen.gemv_int8 import I8_MAX_BATCH
from bitsmith.codegen.spec_checks import refuse
from bitsmith.codegen.target import Target
from bitsmith.codegen.vnni_ir import hmax, llvm_intrin, local_buffer, prefetch
from bitsmith.runtime.interleave import BLOCK, ROWS

X16_BITS = (4, 8)  # (ROWS: output rows per vector, BLOCK: inputs per activation scale, from the layout)
PREFETCH_BYTES = 8192  # software prefetch distance in the codes
MAX_TILE = 16  # batch rows whose accumulators stay in registers together


@dataclass(frozen=True)
class QGemvX16Spec:
    """y[batch, out] = x @ dequant(W).T, W in the 16-row interleaved layout.

    Arguments: x f32 [batch, in], qweight uint8 [out / 16, in / 32, 16 * 32 * bits / 8], scales f16
    [out / 16, n_groups, 16], [zeros f16 [out / 16, n_groups, 16] when not sym], y f32 [batch, out].
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int = 32
    sym: bool = True
    batch: int = 1
    activations: ClassVar[str] = "int8"  # what the target must support (Target.check)

    def __post_init__(self) -> None:
        problems = x16_problems(self.out_features, self.in_features, self.bits, self.group_size)
        if not 1 <= self.batch <= I8_MAX_BATCH:
            problems.append(f"batch {self.batch} (use 1..{I8_MAX_BATCH})")
        refuse(problems, "gemv_x16", fix="use QGemvI8Spec (the lane-per-k layout)")

    @property
    def group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group

    @property
    def name(self) -> str:
        group = "ch" if self.group_size == -1 else str(self.group_size)
        return (f"qgemv_x16_b{self.bits}_g{group}_{'sym' if self.sym else 'asym'}"
                f"_n{self.out_features}_k{self.in_features}_bs{self.batch}")

    def weight_shape(self) -> tuple[int, int, int]:
        return self.out_features // ROWS, self.in_features // BLOCK, ROWS * BLOCK * self.bits // 8

    def weight_bytes(self) -> int:
        """Bytes the kernel reads for W (codes + fp16 scales and zeros)."""
        return self.out_features * self.in_features * self.bits // 8 + \
            self.out_features * self.n_groups * 2 * (1 if self.sym else 2)

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc (KernelSpec protocol); refuses targets without AVX-512 VNNI (GPUs included)."""
        target.check(self)
        return _build(self)


def x16_problems(out_features: int, in_features: int, bits: int, group_size: int) -> list[str]:
    """Why a matmul cannot use the interleaved layout (empty: it can)."""
    problems = []
    if bits not in X16_BITS:
        problems.append(f"bits {bits} (use {X16_BITS})")
    if out_features < 1 or out_features % ROWS:
        problems.append(f"{out_features} output rows (a multiple of {ROWS})")
    if in_features < 1 or in_features % BLOCK:
        problems.append(f"{in_features} inputs (a multiple of {BLOCK})")
    elif group_size != -1 and (group_size % BLOCK or in_features % group_size):
        problems.append(f"group size {group_size} (a multiple of {BLOCK} dividing {in_features}, or -1)")
    return problems


def register_tile(batch: int) -> int:
    """Batch rows per register tile: the largest divisor of batch up to MAX_TILE."""
    return max(t for t in range(1, min(batch, MAX_TILE) + 1) if batch % t == 0)


def _build(spec: QGemvX16Spec) -> Any:
    n_out, n_in, batch, bits = spec.out_features, spec.in_features, spec.batch, spec.bits
    groups, kb_n = n_out // ROWS, n_in // BLOCK  # 16-row groups, 32-value blocks
    vec_bytes = ROWS * BLOCK * bits // 8  # codes of one (group, block)
    n_vec = vec_bytes // 64  # 64-byte vectors per (group, block): 4 (int4) or 8 (int8)
    blocks_per_group = spec.group // BLOCK
    zconst = 1 << (bits - 1)
    tile = register_tile(batch)
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x = T.arg("x", T.Buffer((batch, n_in), "float32"))
            w = T.arg("qweight", T.Buffer((groups * kb_n * vec_bytes,), "uint8"))
            s = T.arg("scales", T.Buffer((groups * spec.n_groups * ROWS,), "float16"))
            z = None if spec.sym else T.arg("zeros", T.Buffer((groups * spec.n_groups * ROWS,), "float16"))
            y = T.arg("y", T.Buffer((batch, n_out), "float32"))
            xq = T.alloc_buffer((batch * n_in // 4,), "int32")  # 4 int8 codes per word, row-major
            sx = T.alloc_buffer((batch * kb_n,), "float32")  # activation scale per 32-block
            xsum = T.alloc_buffer((batch * kb_n,), "int32")  # sum of the block's codes

            # ---- 1. quantize x per 32 values (once per call)
            with T.serial(0, batch) as n, T.serial(0, kb_n) as b:
                halves = [T.bind(x[n, tirx.Ramp(b * BLOCK + 16 * u, 1, 16)]) for u in range(2)]
                amax = hmax(T.bind(tirx.max(tirx.abs(halves[0]), tirx.abs(halves[1]))), 16)
                T.buffer_store(sx, amax / f32(127.0), [n * kb_n + b])
                inv = T.bind(tirx.Select(amax > f32(0.0), f32(127.0) / amax, f32(0.0)))
                total = tirx.Broadcast(i32(0), 16)
                for u, half in enumerate(halves):
                    code = T.bind(tirx.Cast("int32x16", tirx.min(tirx.max(
                        T.nearbyint(half * tirx.Broadcast(inv, 16)), f32(-127.0)), f32(127.0))))
                    total = total + code
                    as8 = T.bind(tirx.Cast("int8x16", code))
                    T.buffer_store(xq, T.reinterpret(as8, dtype="int32x4"),
                                   [tirx.Ramp((n * n_in + b * BLOCK + 16 * u) // 4, 1, 4)])
                T.buffer_store(xsum, hsum_i32(T.bind(total)), [n * kb_n + b])

            # ---- 2. 16 output rows per parallel iteration, every batch row, every block
            with T.parallel(0, groups) as g:
                acc = local_buffer((tile * ROWS,), "float32")
                with T.serial(0, batch // tile) as nb:
                    T.buffer_store(acc, tirx.Broadcast(f32(0.0), tile * ROWS), [tirx.Ramp(0, 1, tile * ROWS)])
                    with T.serial(0, kb_n) as b:
                        at = (g * kb_n + b) * vec_bytes
                        for line in range(0, vec_bytes, 64):
                            prefetch(w[at + PREFETCH_BYTES + line], 3)
                        codes = _codes(T, tirx, w, at, n_vec, bits)
                        grp = tirx.floordiv(b, blocks_per_group)
                        scale = T.bind(tirx.Cast("float32x16", s[tirx.Ramp((g * spec.n_groups + grp) * ROWS, 1, ROWS)]))
                        zero = None if z is None else T.bind(
                            tirx.Cast("float32x16", z[tirx.Ramp((g * spec.n_groups + grp) * ROWS, 1, ROWS)]))
                        for ni in range(tile):
                            n = nb * tile + ni
                            meta = n * kb_n + b
                            dot = tirx.Broadcast(xsum[meta] * i32(-zconst), ROWS) if spec.sym else \
                                tirx.Broadcast(i32(0), ROWS)
                            for c, code in enumerate(codes):
                                act = tirx.Broadcast(xq[(n * n_in + b * BLOCK) // 4 + c], ROWS)
                                dot = llvm_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", dot, code,
                                                  T.reinterpret(act, dtype="int8x64"))
                            val = tirx.Cast("float32x16", dot)
                            if zero is not None:
                                val = val - zero * tirx.Broadcast(tirx.Cast("float32", xsum[meta]), ROWS)
                            here = tirx.Ramp(ni * ROWS, 1, ROWS)
                            T.buffer_store(acc, acc[here] + val * tirx.Broadcast(sx[meta], ROWS) * scale, [here])
                    for ni in range(tile):
                        T.buffer_store(y, acc[tirx.Ramp(ni * ROWS, 1, ROWS)],
                                       [nb * tile + ni, tirx.Ramp(g * ROWS, 1, ROWS)])
    return ib.get()


def _codes(T: Any, tirx: Any, w: Any, at: Any, n_vec: int, bits: int) -> list[Any]:
    """The (group, block)'s code vectors as uint8 x 64, vector c holding k = 4 c .. 4 c + 3 of every row."""
    raw = [T.bind(w[tirx.Ramp(at + 64 * v, 1, 64)]) for v in range(n_vec)]
    if bits == 8:
        return [T.reinterpret(r, dtype="int8x64") for r in raw]
    mask = tirx.Broadcast(tirx.const(0x0F, "uint8"), 64)
    four = tirx.Broadcast(tirx.const(4, "uint8"), 64)
    out = []
    for r in raw:  # low nibbles: c = 2 v, high nibbles: c = 2 v + 1
        out.append(T.reinterpret(T.bind(r & mask), dtype="int8x64"))
        out.append(T.reinterpret(T.bind((r >> four) & mask), dtype="int8x64"))
    return out


def hsum_i32(v: Any) -> Any:
    """Sum of the 16 lanes of an int32 vector (a halving tree)."""
    lanes = 16
    while lanes > 1:
        lanes //= 2
        v = T.bind(tirx.Shuffle([v], list(range(lanes))) + tirx.Shuffle([v], list(range(lanes, 2 * lanes))))
    return v

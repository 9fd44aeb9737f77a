"""Embedding lookups: a dense float32/float16/bfloat16 table, or a table packed like a qlinear weight (one
packed row per token, see bitsmith.runtime.packed_layout), dequantized on the fly.

Token ids outside [0, vocab) are clamped to the nearest valid row, so a bad id can never read out of
bounds (the numpy reference raises instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx
from tvm.s_tir import Schedule

from bitsmith.codegen.common import f32, fconst, finish, schedule_rows, worth_parallel
from bitsmith.codegen.dequant import table_row, unpack_code
from bitsmith.codegen.gpu.compute import embedding_tensors, qembedding_tensors
from bitsmith.codegen.gpu.schedule import dlight, te_func
from bitsmith.codegen.spec_checks import PARAM_DTYPES, check_param_dtype, check_positive, refuse
from bitsmith.codegen.target import Target
from bitsmith.runtime.packed_layout import LANES, PACK_BITS, lane_unit, packed_shape


QEMB_BITS = (2, 3, 4, 8)  # packed tables: the plain forms only (not the 5/6-bit, group-16, min or two-level
QEMB_GROUPS = (32, 64, 128, -1)  # forms of imported GGUF weights)


def _check_index_range(problems: list[str], elements: int) -> None:
    if elements >= 1 << 31:  # element offsets are int32
        problems.append(f"a table of {elements} elements (at most 2^31 - 1)")


@dataclass(frozen=True)
class EmbeddingSpec:
    """y[rows, dim] = table[clamp(ids), :] as float32, table float32, float16 or bfloat16
    (args: table [vocab, dim], ids int64 [rows], y)."""

    rows: int
    vocab: int
    dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, vocab=self.vocab, dim=self.dim)
        check_param_dtype(problems, self.dtype, "table")
        _check_index_range(problems, self.vocab * self.dim)
        refuse(problems, "embedding")

    @property
    def name(self) -> str:
        return f"embedding_{PARAM_DTYPES[self.dtype]}_r{self.rows}_v{self.vocab}_d{self.dim}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): table, ids, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        func = schedule_rows(te.create_prim_func(embedding_tensors(self)), "y", self.rows, self.dim, target.lanes(4))
        return finish(func, self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(embedding_tensors(self), self.name)


@dataclass(frozen=True)
class QEmbeddingSpec:
    """y[rows, dim] = dequant(table)[clamp(ids), :] for a `bits`-bit packed table
    (args: qweight uint32 [vocab, words], scales f16 [vocab, groups], [zeros f16 [vocab, groups] when
    asymmetric], ids int64 [rows], y). w = (q - z) * s; z = 2^(bits-1) when sym."""

    rows: int
    vocab: int
    dim: int
    bits: int
    group_size: int = -1
    sym: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, vocab=self.vocab, dim=self.dim)
        if self.bits not in QEMB_BITS:
            problems.append(f"bits {self.bits} (use one of {QEMB_BITS}"
                            + ("; 5/6-bit codes are GGUF forms: store the table dequantized, as float16)"
                               if self.bits in PACK_BITS else ")"))
        if self.group_size not in QEMB_GROUPS:
            problems.append(f"group size {self.group_size} (use one of {QEMB_GROUPS}"
                            + ("; groups of 16 are a GGUF K-quant form: store the table dequantized, as float16)"
                               if self.group_size == 16 else ")"))
        if not problems:
            _check_index_range(problems, self.vocab * max(self.weight_shape()[1], self.n_groups))
        refuse(problems, "qembedding")

    @property
    def group(self) -> int:
        return self.dim if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return -(-self.dim // self.group)

    @property
    def name(self) -> str:
        group = "ch" if self.group_size == -1 else str(self.group_size)
        return (f"qembedding_b{self.bits}_g{group}_{'sym' if self.sym else 'asym'}"
                f"_r{self.rows}_v{self.vocab}_d{self.dim}")

    def weight_shape(self) -> tuple[int, int]:
        return packed_shape(self.vocab, self.dim, self.bits)

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): qweight, scales, [zeros], ids, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        rows, vocab, dim, bits = self.rows, self.vocab, self.dim, self.bits
        units, slots = lane_unit(bits)
        full, rest = divmod(dim, LANES * slots)
        base = full * LANES * slots  # first k of the tail block
        tail_lanes = -(-rest // slots)
        w = te.placeholder(self.weight_shape(), "uint32", name="qweight")
        s = te.placeholder((vocab, self.n_groups), "float16", name="scales")
        z = None if self.sym else te.placeholder((vocab, self.n_groups), "float16", name="zeros")
        ids = te.placeholder((rows,), "int64", name="ids")

        def dequant(o: Any, k: Any, code: Any) -> Any:
            g = 0 if self.group_size == -1 else tirx.floordiv(k, self.group)
            zero = fconst(float(1 << (bits - 1))) if z is None else f32(z[o, g])
            return (code - zero) * f32(s[o, g])

        def main(o: Any, k: Any) -> Any:  # k = kb*16*S + j*16 + l
            kb, j = tirx.floordiv(k, LANES * slots), tirx.floormod(tirx.floordiv(k, LANES), slots)
            return dequant(o, k, unpack_code(w, o, kb * LANES * units, j, tirx.floormod(k, LANES), LANES, bits))

        def tail(o: Any, k: Any) -> Any:  # k = base + j*L + l
            t = k - base
            j, lane = tirx.floordiv(t, tail_lanes), tirx.floormod(t, tail_lanes)
            return dequant(o, k, unpack_code(w, o, full * LANES * units, j, lane, tail_lanes, bits))

        def body(r: Any, k: Any) -> Any:
            o = table_row(ids, r, vocab)
            if not rest:
                return main(o, k)
            if not full:
                return tail(o, k)
            # both sides stay in bounds; loop_partition lets the simplifier drop the Select
            return tirx.Select(k < base, main(o, tirx.min(k, base - 1)), tail(o, tirx.max(k, base)))

        y = te.compute((rows, dim), body, name="y")
        params = [w, s] + ([] if z is None else [z]) + [ids, y]
        return finish(self._schedule(te.create_prim_func(params), target.lanes(4), full, slots), self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(qembedding_tensors(self), self.name)

    def _schedule(self, func: Any, lanes: int, full: int, slots: int) -> Any:
        """Rows in parallel (when worth it); per row the full blocks as (block, slot unrolled, 16 lanes
        vectorized), then the tail block as a scalar loop."""
        sch = Schedule(func)
        row, k = sch.get_loops(sch.get_sblock("y"))
        if worth_parallel(self.rows * self.dim) and self.rows > 1:
            sch.parallel(row)
        if full:
            if full * LANES * slots < self.dim:
                k = sch.loop_partition(k, [full * LANES * slots])[0]
            _, j, lane = sch.split(k, [full, slots, LANES])
            sch.unroll(j)
            if LANES % lanes == 0:
                sch.vectorize(sch.split(lane, [None, lanes])[1])
        return sch.mod["main"]

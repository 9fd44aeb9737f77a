"""Kernels for a tensor and a compile-time scalar (x * c, c - x, ...), for a strided slice along one axis and a
column gather: what traced graphs leave between the fused ops (embedding and residual multipliers, logit
soft-caps, fused qkv / gate-up projections split by slicing) and act-order matmuls' activation permutation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx

from bitsmith.codegen.common import fconst, finish, schedule_flat, worth_parallel
from bitsmith.codegen.gpu.schedule import dlight, te_func
from bitsmith.codegen.kernel import c_float
from bitsmith.codegen.spec_checks import check_positive, refuse
from bitsmith.codegen.target import Target
from tvm.s_tir import Schedule

SCALAR_OPS = ("add", "sub", "mul", "div")


def scalar_expr(op: str, x: Any, c: Any, const_first: bool) -> Any:
    a, b = (c, x) if const_first else (x, c)
    return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b}[op]()


@dataclass(frozen=True)
class ScalarSpec:
    """y[n] = x[n] op c, or c op x when `const_first`; c a float32 constant built into the kernel (args: x, y)."""

    n: int
    op: str
    value: float
    const_first: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, n=self.n)
        if self.op not in SCALAR_OPS:
            problems.append(f"op {self.op!r} (use one of {SCALAR_OPS})")
        refuse(problems, "scalar")

    @property
    def name(self) -> str:
        return f"{self.op}{'_rev' if self.const_first else ''}_c{c_float(self.value)}_n{self.n}"

    def tensors(self) -> list[Any]:
        x = te.placeholder((self.n,), "float32", name="x")
        c = fconst(self.value)
        return [x, te.compute((self.n,), lambda i: scalar_expr(self.op, x[i], c, self.const_first), name="y")]

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        return finish(schedule_flat(te.create_prim_func(self.tensors()), self.n, target.lanes(4)), self.name)

    def gpu_definition(self) -> Any:
        return te_func(self.tensors(), self.name)


@dataclass(frozen=True)
class SliceSpec:
    """x viewed as [outer, axis, inner]: y[o, j, i] = x[o, start + j * step, i] for j < count (args: x, y)."""

    outer: int
    axis: int
    inner: int
    start: int
    count: int
    step: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, outer=self.outer, axis=self.axis, inner=self.inner, count=self.count, step=self.step)
        if self.start < 0 or self.start + (self.count - 1) * self.step >= self.axis:
            problems.append(f"slice [{self.start}::{self.step}] x {self.count} of an axis of {self.axis}")
        refuse(problems, "slice")

    @property
    def name(self) -> str:
        return (f"slice_o{self.outer}_a{self.axis}_i{self.inner}_s{self.start}_c{self.count}"
                + (f"_st{self.step}" if self.step != 1 else ""))

    def tensors(self) -> list[Any]:
        x = te.placeholder((self.outer, self.axis, self.inner), "float32", name="x")
        y = te.compute((self.outer, self.count, self.inner),
                       lambda o, j, i: x[o, self.start + j * self.step, i], name="y")
        return [x, y]

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, y (a copy, contiguous rows)."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        sch = Schedule(te.create_prim_func(self.tensors()))
        o, j, i = sch.get_loops(sch.get_sblock("y"))
        lanes = target.lanes(4)
        if self.inner % lanes == 0 and self.inner >= lanes:
            _, vec = sch.split(i, factors=[None, lanes])
            sch.vectorize(vec)
        if worth_parallel(self.outer * self.count * self.inner) and self.outer > 1:
            sch.parallel(o)
        return finish(sch.mod["main"], self.name)

    def gpu_definition(self) -> Any:
        return te_func(self.tensors(), self.name)


@dataclass(frozen=True)
class GatherSpec:
    """y[r, c] = x[r, perm[c]] for x [rows, cols] and perm int32 [cols] (args: x, perm, y): the activations of a
    matmul whose weight columns are stored in act-order (GPTQ `g_idx`), gathered once per call. An index out of
    [0, cols) is clamped (a bad perm never reads out of bounds; the artifact's loader checks it is a permutation)."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, cols=self.cols)
        refuse(problems, "gather")

    @property
    def name(self) -> str:
        return f"gather_cols_r{self.rows}_c{self.cols}"

    def tensors(self) -> list[Any]:
        x = te.placeholder((self.rows, self.cols), "float32", name="x")
        perm = te.placeholder((self.cols,), "int32", name="perm")

        def body(r: Any, c: Any) -> Any:
            return x[r, tirx.max(tirx.min(perm[c], self.cols - 1), 0)]

        return [x, perm, te.compute((self.rows, self.cols), body, name="y")]

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, perm, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        sch = Schedule(te.create_prim_func(self.tensors()))
        r, c = sch.get_loops(sch.get_sblock("y"))
        if worth_parallel(self.rows * self.cols) and self.rows > 1:
            sch.parallel(r)
        return finish(sch.mod["main"], self.name)

    def gpu_definition(self) -> Any:
        return te_func(self.tensors(), self.name)

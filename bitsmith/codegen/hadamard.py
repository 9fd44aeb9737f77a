"""The online Hadamard kernels: y = x @ (H_p (x) M) / sqrt(p) per row, alone or fused after SwiGLU or RoPE.

Layout and definition as bitsmith.runtime.hadamard (n = p * m, M an m x m factor, absent when m = 1):

    x0     the row's input: x, act(gate) * up (HadamardSpec gate="silu"/"gelu"/"gelu_tanh"), or rope(x)
           (RopeHadamardSpec)
    dense  t[a*m + d] = sum_b x0[a*m + b] * M[b, d]                          (m > 1 only; n*m multiply-adds)
    bfly_s log2(p) stages, stride s_k = m * 2^k: i in the first half of its block of 2 s_k -> u + v,
           else u - v, with (u, v) = (t[i], t[i + s_k]) or (t[i - s_k], t[i]); the last stage times 1/sqrt(p)

so a row costs n (log2 p + m) operations, never a dense n x n product. Every stage is a [.., n] TE block;
the CPU schedule computes all of them per row (a few KiB that stay in L1) with the row's output, and splits
each butterfly loop into (block, half, stride) so the half is a constant after unrolling and the stride
loop vectorizes. The GPU schedule (gpu/hadamard.py) runs one thread block per row over shared memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from tvm import te, tirx
from tvm.s_tir import Schedule

from bitsmith.codegen.common import MAX_VECTOR, f32, fconst, finish, vectorize_part, worth_parallel
from bitsmith.codegen.dequant import weight_placeholder
from bitsmith.codegen.elementwise import activation
from bitsmith.codegen.gpu.compute import activation as gpu_activation
from bitsmith.codegen.gpu.hadamard import schedule_hadamard
from bitsmith.codegen.gpu.schedule import te_func
from bitsmith.codegen.norm_rope import ROPE_STYLES, rope_element
from bitsmith.codegen.spec_checks import PARAM_DTYPES, check_param_dtype, check_positive, refuse
from bitsmith.codegen.target import Target
from bitsmith.runtime.hadamard import is_power_of_two

UNROLLED_FACTOR = 64  # dense factors up to this order are written out as m products (vectorized), larger ones reduce
# HadamardSpec.gate: "" reads x; an activation reads act(gate) * up (SwiGLU / GeGLU, the input of down_proj)
GATES = ("", "silu", "gelu", "gelu_tanh")


def _size_problems(problems: list[str], n: int, factor: int, factor_dtype: str) -> None:
    if isinstance(n, int) and isinstance(factor, int) and factor >= 1 and (n % factor or not is_power_of_two(n // factor)):
        problems.append(f"size {n} with factor {factor} (n must be a power of two times the factor's order)")
    check_param_dtype(problems, factor_dtype, "factor")


def _factor_token(factor: int, factor_dtype: str) -> str:
    return f"_m{factor}{PARAM_DTYPES[factor_dtype]}" if factor > 1 else ""


@dataclass(frozen=True)
class HadamardSpec:
    """y[rows, n] = hadamard(x0) with x0 = x, or act(gate) * up for gate silu, gelu (erf) or gelu_tanh; the factor
    [m, m] (m = `factor` > 1) is float32, float16 or bfloat16 (args: x | gate, up; [factor]; y)."""

    rows: int
    n: int
    factor: int = 1
    factor_dtype: str = "float32"
    gate: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, n=self.n, factor=self.factor)
        _size_problems(problems, self.n, self.factor, self.factor_dtype)
        if self.gate not in GATES:
            problems.append(f"gate {self.gate!r} (use one of {GATES})")
        refuse(problems, "hadamard")

    @property
    def name(self) -> str:
        gate = f"{self.gate}_mul_" if self.gate else ""
        return f"{gate}hadamard_r{self.rows}_n{self.n}{_factor_token(self.factor, self.factor_dtype)}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x | gate, up; [factor]; y."""
        if target.is_gpu:
            return schedule_hadamard(self.gpu_definition(), row_axes=1, stages=_stage_names(self))
        return finish(_schedule_cpu(te.create_prim_func(self._tensors(activation)), self, target.lanes(4)), self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc; built for a CPU it checks the GPU semantics."""
        return te_func(self._tensors(gpu_activation), self.name)

    def _tensors(self, act: Callable[[str, Any], Any]) -> list[Any]:
        shape = (self.rows, self.n)
        if self.gate:
            gate = te.placeholder(shape, "float32", name="gate")
            up = te.placeholder(shape, "float32", name="up")
            x0 = te.compute(shape, lambda r, i: act(self.gate, gate[r, i]) * up[r, i], name="x0")
            inputs = [gate, up]
        else:
            x = te.placeholder(shape, "float32", name="x")
            x0, inputs = x, [x]
        factor = weight_placeholder((self.factor, self.factor), self.factor_dtype, "factor") if self.factor > 1 else None
        return inputs + ([factor] if factor is not None else []) + [hadamard_stages(x0, self.n, self.factor, factor)]


@dataclass(frozen=True)
class RopeHadamardSpec:
    """y[rows, heads, head_dim] = hadamard(rope(x)) per head: RoPE as RopeSpec (positions int64[rows], inv_freq
    f32[rotary_dim / 2]), then the transform of each head's head_dim values (args: x, positions, inv_freq,
    [factor], y). The rotated q and k that attention reads (and the KV cache keeps) in one kernel."""

    rows: int
    heads: int
    head_dim: int
    rotary_dim: int
    style: str = "half"
    factor: int = 1
    factor_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, heads=self.heads, head_dim=self.head_dim,
                       rotary_dim=self.rotary_dim, factor=self.factor)
        if isinstance(self.rotary_dim, int) and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            problems.append(f"rotary_dim {self.rotary_dim} (must be even and <= head_dim {self.head_dim})")
        if self.style not in ROPE_STYLES:
            problems.append(f"style {self.style!r} (use one of {ROPE_STYLES})")
        _size_problems(problems, self.head_dim, self.factor, self.factor_dtype)
        refuse(problems, "rope_hadamard")

    @property
    def name(self) -> str:
        return (f"rope_{self.style}_hadamard_r{self.rows}_h{self.heads}_d{self.head_dim}_rot{self.rotary_dim}"
                f"{_factor_token(self.factor, self.factor_dtype)}")

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, positions, inv_freq, [factor], y."""
        if target.is_gpu:
            return schedule_hadamard(self.gpu_definition(), row_axes=2, stages=_stage_names(self))
        return finish(_schedule_cpu(te.create_prim_func(self._tensors(gpu=False)), self, target.lanes(4)), self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc; built for a CPU it checks the GPU semantics."""
        return te_func(self._tensors(gpu=True), self.name)

    def _tensors(self, gpu: bool) -> list[Any]:
        rows, heads, hd, half = self.rows, self.heads, self.head_dim, self.rotary_dim // 2
        x = te.placeholder((rows, heads, hd), "float32", name="x")
        pos = te.placeholder((rows,), "int64", name="positions")
        inv = te.placeholder((half,), "float32", name="inv_freq")
        if gpu:  # cos and sin per element (libm), as the GPU rope kernel
            def cos(r: Any, i: Any) -> Any:
                return tirx.cos(tirx.Cast("float32", pos[r]) * inv[i])

            def sin(r: Any, i: Any) -> Any:
                return tirx.sin(tirx.Cast("float32", pos[r]) * inv[i])
        else:  # once per row (the CPU schedule computes them with the row)
            angle = te.compute((rows, half), lambda r, i: tirx.Cast("float32", pos[r]) * inv[i], name="angle")
            cos_t = te.compute((rows, half), lambda r, i: tirx.cos(angle[r, i]), name="cos")
            sin_t = te.compute((rows, half), lambda r, i: tirx.sin(angle[r, i]), name="sin")
            cos, sin = (lambda r, i: cos_t[r, i]), (lambda r, i: sin_t[r, i])
        x0 = te.compute((rows, heads, hd), lambda r, h, d: rope_element(x, cos, sin, r, h, d, hd, self.rotary_dim,
                                                                            self.style == "interleaved"), name="x0")
        factor = weight_placeholder((self.factor, self.factor), self.factor_dtype, "factor") if self.factor > 1 else None
        return [x, pos, inv] + ([factor] if factor is not None else []) + [hadamard_stages(x0, hd, self.factor, factor)]


def hadamard_stages(x0: Any, n: int, m: int, factor: Any | None) -> Any:
    """The transform of x0's last axis (n = p * m) as TE stages "dense" (m > 1), "bfly0".."bfly{k-1}"; the
    returned output "y" is the last butterfly with the 1/sqrt(p) scale (a copy of its input when p = 1)."""
    p = n // m
    cur = x0
    if factor is not None:
        cur = te.compute(x0.shape, _dense_factor(x0, factor, m), name="dense")
    scale = fconst(1.0 / math.sqrt(p))
    if p == 1:
        return te.compute(x0.shape, lambda *idx: cur(*idx) * scale, name="y")
    stages = int(math.log2(p))
    for k in range(stages):
        last = k == stages - 1
        cur = te.compute(x0.shape, _butterfly(cur, m << k, n, scale if last else None), name="y" if last else f"bfly{k}")
    return cur


def _dense_factor(x0: Any, factor: Any, m: int) -> Callable[..., Any]:
    """t[a*m + d] = sum_b x0[a*m + b] * M[b, d]: up to UNROLLED_FACTOR terms written out (b = 0, 1, ... in order:
    a spatial block whose d loop vectorizes over M's contiguous rows), else a TE reduction over b."""
    if m > UNROLLED_FACTOR:
        b = te.reduce_axis((0, m), "b")

        def reduced(*idx: Any) -> Any:
            *outer, i = idx
            return te.sum(x0(*outer, i // m * m + b) * f32(factor[b, i % m]), axis=b)

        return reduced

    def unrolled(*idx: Any) -> Any:
        *outer, i = idx
        base, d = i // m * m, i % m
        total = x0(*outer, base) * f32(factor[0, d])
        for k in range(1, m):
            total = total + x0(*outer, base + k) * f32(factor[k, d])
        return total

    return unrolled


def _butterfly(prev: Any, stride: int, n: int, scale: Any | None) -> Callable[..., Any]:
    """out[i] = prev[i] + prev[i + stride] in the first half of i's block of 2 * stride, prev[i - stride] -
    prev[i] in the second (indices clamped so that both sides of the Select stay in bounds)."""

    def body(*idx: Any) -> Any:
        *outer, i = idx
        upper = tirx.floormod(tirx.floordiv(i, stride), 2) == 0
        plus = prev(*outer, i) + prev(*outer, tirx.min(i + stride, n - 1))
        minus = prev(*outer, tirx.max(i - stride, 0)) - prev(*outer, i)
        out = tirx.Select(upper, plus, minus)
        return out if scale is None else out * scale

    return body


def _stage_names(spec: HadamardSpec | RopeHadamardSpec) -> list[str]:
    """The intermediate blocks before the output y, in order (what the schedules place per row)."""
    n, m = (spec.n, spec.factor) if isinstance(spec, HadamardSpec) else (spec.head_dim, spec.factor)
    k = int(math.log2(n // m))
    has_x0 = isinstance(spec, RopeHadamardSpec) or bool(spec.gate)
    return (["x0"] if has_x0 else []) + (["dense"] if m > 1 else []) + [f"bfly{s}" for s in range(max(k - 1, 0))]


def _schedule_cpu(func: Any, spec: HadamardSpec | RopeHadamardSpec, lanes: int) -> Any:
    """Rows (and heads) outer, every stage of a row computed with it (per-row buffers), each butterfly's loop
    split into (block, half, stride): half unrolled (its Select folds), stride vectorized."""
    sch = Schedule(func)
    y = sch.get_sblock("y")
    rope = isinstance(spec, RopeHadamardSpec)
    loops = sch.get_loops(y)
    row = loops[0]
    at = loops[-2]  # the (row) or (row, head) loop every stage is computed in
    stages = _stage_names(spec)
    for name in reversed(stages):
        sch.compute_at(sch.get_sblock(name), at)
    if rope:
        sch.compute_inline(sch.get_sblock("angle"))
        for name in ("sin", "cos"):
            sch.compute_at(sch.get_sblock(name), row)
    n = spec.head_dim if rope else spec.n
    m = spec.factor
    total = spec.rows * (spec.heads if rope else 1) * n
    if worth_parallel(total * max(1, int(math.log2(n // m)) + m)) and spec.rows > 1:
        sch.parallel(row)
    for k, name in enumerate([s for s in stages if s.startswith("bfly")] + (["y"] if n // m > 1 else [])):
        _split_butterfly(sch, sch.get_sblock(name), m << k, lanes)
    if n // m == 1:
        _vectorize(sch, sch.get_loops(y)[-1], lanes)
    if rope:
        _partition_rope(sch, spec, lanes)
    elif "x0" in stages:
        _vectorize(sch, sch.get_loops(sch.get_sblock("x0"))[-1], lanes)
    if 1 < m <= UNROLLED_FACTOR:  # per group a of m: d over the factor's contiguous row, one vector
        _vectorize(sch, sch.split(sch.get_loops(sch.get_sblock("dense"))[-1], [None, m])[1], lanes)
    elif m > 1:
        dense = sch.get_sblock("dense")
        *_, i, b = sch.get_loops(dense)
        a, d = sch.split(i, [None, m])
        sch.reorder(a, b, d)  # d innermost: the row of the factor is contiguous
        init = sch.decompose_reduction(dense, b)
        _vectorize(sch, sch.get_loops(init)[-1], lanes)
        sch.unroll(sch.get_loops(dense)[-1])  # vectorize refuses a loop inside a reduction; LLVM's SLP packs it
    return sch.mod["main"]


def _partition_rope(sch: Any, spec: RopeHadamardSpec, lanes: int) -> None:
    """RoPE's feature loop cut at the pair boundaries (each part's Selects fold away), each part vectorized, as
    RopeSpec's schedule; interleaved pairs as an unrolled (even, odd) step. (Vectorizing the uncut loop reads
    past the row where a Select's other side is out of bounds: NaNs, seen with TVM 0.27.)"""
    d = sch.get_loops(sch.get_sblock("x0"))[-1]
    rot, hd, half = spec.rotary_dim, spec.head_dim, spec.rotary_dim // 2
    if spec.style == "half":
        cuts = [half, half] + ([hd - rot] if hd > rot else [])
        for part in sch.loop_partition(d, cuts[:-1]):
            vectorize_part(sch, part, lanes)
        return
    parts = sch.loop_partition(d, [rot]) if hd > rot else [d]
    sch.unroll(sch.split(parts[0], [None, 2])[1])
    if len(parts) > 1:
        vectorize_part(sch, parts[1], lanes)


def _split_butterfly(sch: Any, block: Any, stride: int, lanes: int) -> None:
    i = sch.get_loops(block)[-1]
    _, half, inner = sch.split(i, [None, 2, stride])
    sch.unroll(half)
    if stride > 1:
        _vectorize(sch, inner, lanes)


def _vectorize(sch: Any, loop: Any, lanes: int) -> None:
    """Vectors of `lanes`, or the whole loop as one vector when short (LLVM cuts it into registers)."""
    extent = int(sch.get(loop).extent)
    if extent % lanes == 0 and extent > lanes:
        sch.vectorize(sch.split(loop, [None, lanes])[1])
    elif 1 < extent <= MAX_VECTOR:
        sch.vectorize(loop)

"""Per-row normalizations (rmsnorm, fused residual add + rmsnorm, layernorm) and rotary embeddings.

Formulas follow the numpy references in bitsmith.compiler.ops.llm operation by operation (the sums
run in another order: `lanes` vector accumulators, or a scalar loop when lanes does not divide dim):

    rmsnorm:   y = x / sqrt(sum(x*x) / dim + eps) * w
    layernorm: mu = sum(x) / dim; y = (x - mu) / sqrt(sum((x - mu)^2) / dim + eps) * w [+ b]
    rope:      per pair (a, b) with angle f = float32(pos) * inv_freq[i]:
               (a cos f - b sin f, b cos f + a sin f); "half" pairs (i, i + rot/2), "interleaved"
               pairs (2i, 2i + 1); features from rotary_dim on are copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx
from tvm.s_tir import Schedule

from bitsmith.codegen.common import f32, fconst, finish, rms_stages, schedule_rows, vectorize_part, worth_parallel
from bitsmith.codegen.dequant import weight_placeholder
from bitsmith.codegen.gpu.compute import add_rms_norm_tensors, layer_norm_tensors, rms_norm_tensors, rope_tensors
from bitsmith.codegen.gpu.schedule import dlight, schedule_add_rmsnorm, te_func
from bitsmith.codegen.kernel import c_float
from bitsmith.codegen.spec_checks import PARAM_DTYPES, check_param_dtype, check_positive, refuse
from bitsmith.codegen.target import Target

ROPE_STYLES = ("half", "interleaved")


def _norm_checks(family: str, rows: int, dim: int, weight_dtype: str, eps: float) -> None:
    problems: list[str] = []
    check_positive(problems, rows=rows, dim=dim)
    check_param_dtype(problems, weight_dtype)
    if not isinstance(eps, (int, float)) or eps < 0:
        problems.append(f"eps {eps!r}")
    refuse(problems, family)


def rope_element(x: Any, cos: Any, sin: Any, r: Any, h: Any, d: Any, head_dim: int, rotary_dim: int,
                 interleaved: bool) -> Any:
    """Element d of head h of row r of x[rows, heads, head_dim] after RoPE; cos(r, i) / sin(r, i) give pair i's
    angle. Pairs (2i, 2i + 1) when interleaved, else (i, i + rot/2); dims past rotary_dim pass through. Indices
    are clamped so that both sides of every Select stay in bounds."""
    half = rotary_dim // 2

    def clamp(e: Any, hi: int) -> Any:
        return tirx.max(tirx.min(e, hi), 0)

    if interleaved:  # pair (2i, 2i + 1): d even is the pair's first element
        first = tirx.floormod(d, 2) == 0
        i = clamp(tirx.floordiv(d, 2), half - 1)
        partner = clamp(tirx.Select(first, d + 1, d - 1), head_dim - 1)
    else:  # pair (i, i + rot/2)
        first = d < half
        i = clamp(tirx.Select(first, d, d - half), half - 1)
        partner = clamp(tirx.Select(first, d + half, d - half), head_dim - 1)
    xv, other, c, s = x[r, h, d], x[r, h, partner], cos(r, i), sin(r, i)
    rotated = tirx.Select(first, xv * c - other * s, xv * c + other * s)
    return rotated if rotary_dim == head_dim else tirx.Select(d < rotary_dim, rotated, xv)


@dataclass(frozen=True)
class RmsNormSpec:
    """y[rows, dim] = rmsnorm(x) * w, w[dim] float32, float16 or bfloat16 (args: x, w, y)."""

    rows: int
    dim: int
    weight_dtype: str
    eps: float

    def __post_init__(self) -> None:
        _norm_checks("rmsnorm", self.rows, self.dim, self.weight_dtype, self.eps)

    @property
    def name(self) -> str:
        return f"rmsnorm_{PARAM_DTYPES[self.weight_dtype]}_r{self.rows}_d{self.dim}_eps{c_float(self.eps)}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, w, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        func = schedule_rows(te.create_prim_func(rms_norm_tensors(self)), "y", self.rows, self.dim, target.lanes(4),
                             per_row=("den", "ss"))
        return finish(func, self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(rms_norm_tensors(self), self.name)


@dataclass(frozen=True)
class AddRmsNormSpec:
    """sum = x + residual; y = rmsnorm(sum) * w (args: x, residual, w, sum, y)."""

    rows: int
    dim: int
    weight_dtype: str
    eps: float

    def __post_init__(self) -> None:
        _norm_checks("add_rmsnorm", self.rows, self.dim, self.weight_dtype, self.eps)

    @property
    def name(self) -> str:
        return f"add_rmsnorm_{PARAM_DTYPES[self.weight_dtype]}_r{self.rows}_d{self.dim}_eps{c_float(self.eps)}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, residual, w, sum, y."""
        if target.is_gpu:  # two outputs: dlight's reduction rules refuse it
            return schedule_add_rmsnorm(self.gpu_definition(), self.dim)
        shape = (self.rows, self.dim)
        x = te.placeholder(shape, "float32", name="x")
        res = te.placeholder(shape, "float32", name="residual")
        w = weight_placeholder((self.dim,), self.weight_dtype, "w")
        total = te.compute(shape, lambda r, d: x[r, d] + res[r, d], name="sum")
        y = rms_stages(total, w, self.rows, self.dim, self.eps)
        # the residual sum first in each row (vectorized), then the norm reads it back from L1
        func = schedule_rows(te.create_prim_func([x, res, w, total, y]), "y", self.rows, self.dim,
                             target.lanes(4), per_row=("den", "ss"), lead="sum")
        return finish(func, self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(add_rms_norm_tensors(self), self.name)


@dataclass(frozen=True)
class LayerNormSpec:
    """y[rows, dim] = layernorm(x) * w (+ b when has_bias), w and b float32, float16 or bfloat16
    (args: x, w, [b], y)."""

    rows: int
    dim: int
    weight_dtype: str
    eps: float
    has_bias: bool = True

    def __post_init__(self) -> None:
        _norm_checks("layernorm", self.rows, self.dim, self.weight_dtype, self.eps)

    @property
    def name(self) -> str:
        bias = "bias" if self.has_bias else "nobias"
        return (f"layernorm_{PARAM_DTYPES[self.weight_dtype]}_{bias}_r{self.rows}_d{self.dim}"
                f"_eps{c_float(self.eps)}")

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, w, [b], y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        rows, dim = self.rows, self.dim
        x = te.placeholder((rows, dim), "float32", name="x")
        w = weight_placeholder((dim,), self.weight_dtype, "w")
        b = weight_placeholder((dim,), self.weight_dtype, "b") if self.has_bias else None
        k1, k2 = te.reduce_axis((0, dim), "k1"), te.reduce_axis((0, dim), "k2")
        xs = te.compute((rows,), lambda r: te.sum(x[r, k1], axis=k1), name="xsum")
        mu = te.compute((rows,), lambda r: xs[r] / fconst(dim), name="mu")
        vs = te.compute((rows,), lambda r: te.sum((x[r, k2] - mu[r]) * (x[r, k2] - mu[r]), axis=k2), name="vsum")
        den = te.compute((rows,), lambda r: tirx.sqrt(vs[r] / fconst(dim) + fconst(self.eps)), name="den")

        def body(r: Any, d: Any) -> Any:
            v = (x[r, d] - mu[r]) / den[r] * f32(w[d])
            return v if b is None else v + f32(b[d])

        y = te.compute((rows, dim), body, name="y")
        params = [x, w] + ([b] if b is not None else []) + [y]
        func = schedule_rows(te.create_prim_func(params), "y", rows, dim, target.lanes(4),
                             per_row=("den", "vsum", "mu", "xsum"))
        return finish(func, self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(layer_norm_tensors(self), self.name)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of x[rows, heads, head_dim] at positions int64[rows] with inv_freq
    f32[rotary_dim / 2] (args: x, positions, inv_freq, y).

    cos and sin are computed per row in the kernel (libm precision, float32 angle as the reference);
    a negative position (padding row) is just another angle.
    """

    rows: int
    heads: int
    head_dim: int
    rotary_dim: int
    style: str = "half"

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, heads=self.heads, head_dim=self.head_dim,
                       rotary_dim=self.rotary_dim)
        if isinstance(self.rotary_dim, int) and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            problems.append(f"rotary_dim {self.rotary_dim} (must be even and <= head_dim {self.head_dim})")
        if self.style not in ROPE_STYLES:
            problems.append(f"style {self.style!r} (use one of {ROPE_STYLES})")
        refuse(problems, "rope")

    @property
    def name(self) -> str:
        return f"rope_{self.style}_r{self.rows}_h{self.heads}_d{self.head_dim}_rot{self.rotary_dim}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, positions, inv_freq, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        rows, heads, hd, rot = self.rows, self.heads, self.head_dim, self.rotary_dim
        half = rot // 2
        x = te.placeholder((rows, heads, hd), "float32", name="x")
        pos = te.placeholder((rows,), "int64", name="positions")
        inv = te.placeholder((half,), "float32", name="inv_freq")
        angle = te.compute((rows, half), lambda r, i: tirx.Cast("float32", pos[r]) * inv[i], name="angle")
        cos = te.compute((rows, half), lambda r, i: tirx.cos(angle[r, i]), name="cos")
        sin = te.compute((rows, half), lambda r, i: tirx.sin(angle[r, i]), name="sin")
        interleaved = self.style == "interleaved"

        def body(r: Any, h: Any, d: Any) -> Any:
            return rope_element(x, lambda r_, i: cos[r_, i], lambda r_, i: sin[r_, i], r, h, d, hd, rot, interleaved)

        y = te.compute((rows, heads, hd), body, name="y")
        func = te.create_prim_func([x, pos, inv, y])
        return finish(self._schedule(func, target.lanes(4)), self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(rope_tensors(self), self.name)

    def _schedule(self, func: Any, lanes: int) -> Any:
        """Rows in parallel (when worth it); per row cos/sin of its rot/2 angles, then per head the
        feature loop cut at the pair boundaries (loop_partition: each part's Selects fold away),
        each part vectorized; interleaved pairs as an unrolled (even, odd) step."""
        sch = Schedule(func)
        y = sch.get_sblock("y")
        row, _, d = sch.get_loops(y)
        sch.compute_inline(sch.get_sblock("angle"))
        for name in ("sin", "cos"):
            block = sch.get_sblock(name)
            sch.compute_at(block, row)
        if worth_parallel(self.rows * self.heads * self.head_dim) and self.rows > 1:
            sch.parallel(row)
        rot, hd, half = self.rotary_dim, self.head_dim, self.rotary_dim // 2
        if self.style == "half":
            cuts = [half, half] + ([hd - rot] if hd > rot else [])
            parts = sch.loop_partition(d, cuts[:-1])  # the last part is the rest
            for part in parts:
                vectorize_part(sch, part, lanes)
        else:
            parts = sch.loop_partition(d, [rot]) if hd > rot else [d]
            _, pair = sch.split(parts[0], [None, 2])
            sch.unroll(pair)
            if len(parts) > 1:
                vectorize_part(sch, parts[1], lanes)
        return sch.mod["main"]

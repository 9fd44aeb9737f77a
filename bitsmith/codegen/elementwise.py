"""Elementwise kernels: add/mul, bias add, activations (silu, gelu, gelu_tanh, relu) and the fused
SwiGLU/GeGLU gates. Activations are float32 in and out; a bias keeps its stored float32/float16/bfloat16
dtype.

The norm, rope and embedding families live in norm_rope.py and embedding.py and are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tvm import te, tirx

from bitsmith.codegen.common import fconst, finish, schedule_flat, schedule_rows
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.gpu.compute import bias_add_tensors, binary_tensors, gated_tensors, unary_tensors
from bitsmith.codegen.gpu.schedule import dlight, te_func
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec
from bitsmith.codegen.spec_checks import PARAM_DTYPES, check_param_dtype, check_positive, refuse
from bitsmith.codegen.target import Target

UNARY_OPS = ("silu", "gelu", "gelu_tanh", "relu", "tanh")
BINARY_OPS = ("add", "mul")
__all__ = ["AddRmsNormSpec", "BiasAddSpec", "BinarySpec", "EmbeddingSpec", "GeluMulSpec", "LayerNormSpec",
           "QEmbeddingSpec", "RmsNormSpec", "RopeSpec", "SiluMulSpec", "UnarySpec"]


# exp as Cephes expf: n = round(x log2 e), r = x - n ln2 (Cody-Waite, two constants), a degree-6
# polynomial, times 2^n built in the exponent bits. Plain arithmetic, so it vectorizes (LLVM calls the
# scalar libm expf per element for tirx.exp: 1.5 ns/element, the whole cost of silu). Inputs are
# clamped to [-87, 88], where every result is a normal float; relative error ~2e-7.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def vexp(x: Any) -> Any:
    x = tirx.max(tirx.min(x, fconst(88.0)), fconst(-87.0))
    n = tirx.floor(x * fconst(1.44269504088896341) + fconst(0.5))
    r = x - n * fconst(0.693359375) - n * fconst(-2.12194440e-4)
    p = fconst(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * r + fconst(c)
    p = p * (r * r) + r + fconst(1.0)
    scale = tirx.reinterpret("float32", (tirx.Cast("int32", n) + 127) << 23)
    return p * scale


def vtanh(x: Any) -> Any:
    """tanh(x) = sign(x) (1 - t) / (1 + t), t = exp(-2|x|) (absolute error ~1e-7)."""
    t = vexp(fconst(-2.0) * tirx.abs(x))
    magnitude = (fconst(1.0) - t) / (fconst(1.0) + t)
    return tirx.Select(x < fconst(0.0), -magnitude, magnitude)


def activation(op: str, x: Any) -> Any:
    """op(x) in float32, in the reference's formula order (exp and tanh vectorizable, erf from libm)."""
    one, half = fconst(1.0), fconst(0.5)
    if op == "silu":  # x / (1 + exp(-x))
        return x / (one + vexp(-x))
    if op == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        return half * x * (one + tirx.erf(x / fconst(math.sqrt(2.0))))
    if op == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = fconst(math.sqrt(2.0 / math.pi)) * (x + fconst(0.044715) * (x * x * x))
        return half * x * (one + vtanh(inner))
    if op == "relu":
        return tirx.max(x, fconst(0.0))
    if op == "tanh":
        return vtanh(x)
    raise ValueError(op)


@dataclass(frozen=True)
class BinarySpec:
    """y[n] = a[n] op b[n], op "add" or "mul" (args: a, b, y)."""

    n: int
    op: str

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, n=self.n)
        if self.op not in BINARY_OPS:
            problems.append(f"op {self.op!r} (use one of {BINARY_OPS})")
        refuse(problems, "binary")

    @property
    def name(self) -> str:
        return f"{self.op}_n{self.n}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): a, b, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        return finish(schedule_flat(te.create_prim_func(binary_tensors(self)), self.n, target.lanes(4)), self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(binary_tensors(self), self.name)


@dataclass(frozen=True)
class BiasAddSpec:
    """y[rows, n] = x[rows, n] + b[n], b float32, float16 or bfloat16 (args: x, b, y)."""

    rows: int
    n: int
    bias_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, rows=self.rows, n=self.n)
        check_param_dtype(problems, self.bias_dtype, "bias")
        refuse(problems, "bias_add")

    @property
    def name(self) -> str:
        return f"bias_add_{PARAM_DTYPES[self.bias_dtype]}_r{self.rows}_n{self.n}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, b, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        func = schedule_rows(te.create_prim_func(bias_add_tensors(self)), "y", self.rows, self.n, target.lanes(4))
        return finish(func, self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(bias_add_tensors(self), self.name)


@dataclass(frozen=True)
class UnarySpec:
    """y[n] = op(x[n]), op one of silu, gelu (erf), gelu_tanh, relu (args: x, y)."""

    n: int
    op: str

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, n=self.n)
        if self.op not in UNARY_OPS:
            problems.append(f"op {self.op!r} (use one of {UNARY_OPS})")
        refuse(problems, "unary")

    @property
    def name(self) -> str:
        return f"{self.op}_n{self.n}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): x, y."""
        if target.is_gpu:
            return dlight(self.gpu_definition(), target)
        x = te.placeholder((self.n,), "float32", name="x")
        y = te.compute((self.n,), lambda i: activation(self.op, x[i]), name="y")
        return finish(schedule_flat(te.create_prim_func([x, y]), self.n, target.lanes(4)), self.name)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(unary_tensors(self), self.name)


@dataclass(frozen=True)
class SiluMulSpec:
    """y[n] = silu(gate[n]) * up[n] (SwiGLU; args: gate, up, y)."""

    n: int

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, n=self.n)
        refuse(problems, "silu_mul")

    @property
    def name(self) -> str:
        return f"silu_mul_n{self.n}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): gate, up, y."""
        return _gated(self, "silu", target)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(gated_tensors(self.n, "silu"), self.name)


@dataclass(frozen=True)
class GeluMulSpec:
    """y[n] = gelu(gate[n]) * up[n] (GeGLU; approximate "none" (erf) or "tanh" as the gelu op's attr;
    args: gate, up, y)."""

    n: int
    approximate: str = "tanh"

    def __post_init__(self) -> None:
        problems: list[str] = []
        check_positive(problems, n=self.n)
        if self.approximate not in ("none", "tanh"):
            problems.append(f"approximate {self.approximate!r} (use 'none' or 'tanh')")
        refuse(problems, "gelu_mul")

    @property
    def name(self) -> str:
        return f"gelu_mul_{'tanh' if self.approximate == 'tanh' else 'erf'}_n{self.n}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc for `target`, a CPU or a GPU (KernelSpec protocol): gate, up, y."""
        return _gated(self, self.op, target)

    @property
    def op(self) -> str:
        """The activation of the gate."""
        return "gelu_tanh" if self.approximate == "tanh" else "gelu"

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/compute.py); built for a CPU it checks the GPU semantics."""
        return te_func(gated_tensors(self.n, self.op), self.name)


def _gated(spec: SiluMulSpec | GeluMulSpec, op: str, target: Target) -> Any:
    if target.is_gpu:
        return dlight(spec.gpu_definition(), target)
    n, name = spec.n, spec.name
    gate = te.placeholder((n,), "float32", name="gate")
    up = te.placeholder((n,), "float32", name="up")
    y = te.compute((n,), lambda i: activation(op, gate[i]) * up[i], name="y")
    return finish(schedule_flat(te.create_prim_func([gate, up, y]), n, target.lanes(4)), name)

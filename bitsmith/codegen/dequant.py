"""Reading weights inside a kernel, shared by the CPU and GPU kernels (gemv, gemm, embedding, norms): a code of
the packed layout (bitsmith.runtime.packed_layout) as float32, a group's scale and correction, a dense weight's
buffer and a load from it widened to float32, an embedding table's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx

from bitsmith.runtime.kernel_dtypes import kernel_dtype
from bitsmith.runtime.packed_layout import lane_unit


def f32(e: Any) -> Any:
    """`e` as float32; TE expressions and IRBuilder loads (`ty`, no `dtype`).

    A uint16 is a bfloat16's bit pattern (the only uint16 a kernel reads, see runtime/kernel_dtypes.py): its 16
    bits become the top half of a float32, exactly the bf16 value (one zero-extend and one shift, vectorized on
    every target). Anything else is a cast unless it already is float32.
    """
    dtype = getattr(e, "dtype", None) or str(e.ty)
    if dtype == "uint16":
        return tirx.reinterpret("float32", tirx.Cast("uint32", e) << tirx.const(16, "uint32"))
    return e if dtype == "float32" else tirx.Cast("float32", e)


def weight_placeholder(shape: tuple[int, ...], dtype: str, name: str) -> Any:
    """The TE input of a dense weight stored as `dtype` (float32, float16, or bfloat16 carried as uint16)."""
    return te.placeholder(shape, kernel_dtype(dtype), name=name)


def unpack_code(w: Any, o: Any, word0: Any, j: Any, lane: Any, stride: int, bits: int, biased: bool = False) -> Any:
    """Code c of slot j, lane `lane` in the lane block whose first word is word0 (stride: lanes per block)
    as float32: c, or 2^b + c when `biased`.

    Lane l's U words form one little-endian bit stream; slot j sits at bits [j*b, j*b + b). For b = 3 a
    value may straddle words p and p + 1: or-ing in `(hi << 1) << (31 - off)` brings its high bits down
    and adds only bits >= 32 - off >= b when it does not straddle, which the mask drops (no branch, so
    the same expression vectorizes; once j is an unrolled constant LLVM folds the dead half away).

    `biased` skips the int->float conversion: c goes straight into the top mantissa bits of a float
    whose exponent is that of 2^b, which reads as exactly 2^b + c (one shift and one vpternlogd).
    """
    units, _ = lane_unit(bits)
    p, off = (j * bits) // 32, (j * bits) % 32
    lo = w[o, word0 + p * stride + lane]
    val = lo >> tirx.Cast("uint32", off)
    if units > 1:
        hi = w[o, word0 + tirx.min(p + 1, units - 1) * stride + lane]
        val = val | ((hi << tirx.const(1, "uint32")) << tirx.Cast("uint32", 31 - off))
    if not biased:
        return tirx.Cast("float32", val & tirx.const((1 << bits) - 1, "uint32"))
    mant = (val << tirx.const(23 - bits, "uint32")) & tirx.const(((1 << bits) - 1) << (23 - bits), "uint32")
    return tirx.reinterpret("float32", mant | tirx.const((127 + bits) << 23, "uint32"))


@dataclass(frozen=True)
class GroupParams:
    """A packed weight's group parameters as a kernel reads them (TE tensors or TIR buffers, indexed [o, g]).

    Every form is, per group g of row o,  sum_k w[o, k] x[k] = scale(o, g) * sum_k (bias + q) x - c(o, g) * sum_k x
    for codes decoded as bias + q (bias 2^b in the biased decode of `unpack_code`, else 0), with
        sym      w = s (q - 2^(b-1))   c = s (2^(b-1) + bias)
        asym     w = s (q - z)         c = s (z + bias)
        min      w = s q + m           c = s bias - m          (m: the `zeros` input, an offset)
    s256: s (and m in min form) are int8 codes times fp16 super_scales (super_zeros) [out, ceil(in/256)], one per
    256 columns: s = f32(super[o, g // (256 / G)]) * f32(code[o, g]), exact in float32 (fp16 x int8).
    """

    bits: int
    group: int  # values per group (the row's length when per channel)
    sym: bool
    offset: bool  # min form: `zeros` holds m
    super_group: int  # 0, or 256: two-level scales
    scales: Any
    zeros: Any = None
    super_scales: Any = None
    super_zeros: Any = None

    @classmethod
    def of(cls, layout: Any, buffers: list[Any]) -> GroupParams:
        """From a PackedWeightLayout (or MatmulShape) and its `param_specs()` buffers, in that order."""
        it = iter(buffers)
        scales = next(it)
        zeros = None if layout.sym else next(it)
        supers = (next(it), next(it) if layout.offset else None) if layout.super_group else (None, None)
        return cls(layout.bits, layout.group, layout.sym, layout.offset, layout.super_group, scales, zeros, *supers)

    def _level(self, codes: Any, supers: Any, o: Any, g: Any) -> Any:
        if not self.super_group:
            return f32(codes[o, g])
        return f32(supers[o, g // (self.super_group // self.group)]) * f32(codes[o, g])

    def scale(self, o: Any, g: Any) -> Any:
        return self._level(self.scales, self.super_scales, o, g)

    def correction(self, o: Any, g: Any, bias: float, scale: Any = None) -> Any:
        """c(o, g) for codes decoded as bias + q (see the class docstring); `scale`: scale(o, g) if already read."""
        s = self.scale(o, g) if scale is None else scale
        if self.offset:
            return s * tirx.const(bias, "float32") - self._level(self.zeros, self.super_zeros, o, g)
        zero = tirx.const(float(1 << (self.bits - 1)) + bias, "float32") if self.sym else \
            f32(self.zeros[o, g]) + tirx.const(bias, "float32")
        return s * zero


def table_row(ids: Any, r: Any, vocab: int) -> Any:
    """Table row of token r: its id clamped to [0, vocab), as int32 (a bad id never reads out of bounds)."""
    clamped = tirx.max(tirx.min(ids[r], tirx.const(vocab - 1, ids.dtype)), tirx.const(0, ids.dtype))
    return tirx.Cast("int32", clamped)

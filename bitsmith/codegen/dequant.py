"""Reading weights inside a kernel, shared by the CPU and GPU kernels (gemv, gemm, embedding, norms): a code of
the packed layout (bitsmith.runtime.packed_layout) as float32, a dense weight's buffer and a load from it widened
to float32, an embedding table's row.
"""

from __future__ import annotations

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


def table_row(ids: Any, r: Any, vocab: int) -> Any:
    """Table row of token r: its id clamped to [0, vocab), as int32 (a bad id never reads out of bounds)."""
    clamped = tirx.max(tirx.min(ids[r], tirx.const(vocab - 1, ids.dtype)), tirx.const(0, ids.dtype))
    return tirx.Cast("int32", clamped)

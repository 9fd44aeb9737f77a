"""Quantized GEMV with int8 activations and integer dot products (AVX-512 VNNI on x86-64, sdot on aarch64
+dotprod): the kernel description (QGemvI8Spec); gemv_int8_tir.py / gemv_int8_neon.py build the TIR.

Same arguments and weights as GemvSpec (x f32 [batch, in], packed uint32 codes, fp16 scales, [fp16
zeros], y f32 [batch, out]); x is quantized to int8 per 32 values inside the kernel. Bits 2/3 and
targets without VNNI / dotprod are refused (BitsmithError): use GemvSpec there
(`Target.supports_int8_activations`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import MAX_BATCH, GemvSpec, PackedWeightLayout
from bitsmith.codegen.gemv_int8_neon import build_qgemv_i8_neon
from bitsmith.codegen.gemv_int8_tir import build_qgemv_i8
from bitsmith.codegen.spec_checks import IMPORTED_FORM_FIX, refuse
from bitsmith.codegen.target import Target

I8_BITS = (4, 8)
I8_MAX_BATCH = 64  # batch rows per call (a prefill chunk)


@dataclass(frozen=True)
class QGemvI8Spec(PackedWeightLayout):
    """y[batch, out] = x @ dequant(W).T with x quantized to int8 per 32 values inside the kernel.

    Arguments (as GemvSpec): x f32 [batch, in], qweight uint32 [out, words], scales f16 [out, n_groups],
    [zeros f16 [out, n_groups] when not sym], y f32 [batch, out].
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int = -1
    sym: bool = True
    batch: int = 1
    activations: ClassVar[str] = "int8"  # what the target must support (Target.check)

    def __post_init__(self) -> None:
        extra = [] if self.bits in I8_BITS else [
            f"bits {self.bits} (int8-activation kernels read {I8_BITS}-bit codes; use GemvSpec)"]
        if self.group_size == 16:  # x is quantized per 32 values: a group must cover whole activation blocks
            extra.append(f"groups of 16 (the GGUF K-quant form; {IMPORTED_FORM_FIX})")
        if not 1 <= self.batch <= I8_MAX_BATCH:
            extra.append(f"batch {self.batch} (use 1..{I8_MAX_BATCH})")
        refuse(self.layout_problems(extra), "VNNI int8-activation GEMV")

    @property
    def gemv(self) -> Any:
        """The fp32-activation kernel with the same arguments (the fallback): a GemvSpec, or past its
        MAX_BATCH rows a GemmSpec."""
        if self.batch <= MAX_BATCH:
            return GemvSpec(self.out_features, self.in_features, self.bits, self.group_size, self.sym, self.batch)
        return GemmSpec(self.out_features, self.in_features, self.bits, self.group_size, self.sym, self.batch)

    @property
    def name(self) -> str:
        return f"qgemv_i8a_{self.scheme_tag()}_n{self.out_features}_k{self.in_features}_bs{self.batch}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc (KernelSpec protocol): VNNI on x86-64, sdot on aarch64 (gemv_int8_neon.py, usdot for
        int8 codes with +i8mm); refuses targets without either (GPUs included)."""
        target.check(self)
        if target.arch == "aarch64":
            return build_qgemv_i8_neon(self, usdot="i8mm" in target.features)
        return build_qgemv_i8(self)

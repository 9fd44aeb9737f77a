"""Cast floating-point weights to the artifact's storage dtype (float32, float16 or bfloat16)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.ir import Module, TensorType
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.runtime.safetensors_io import numpy_dtype

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CastWeights(Pass):
    dtype: str
    name = "cast_weights"
    requires = frozenset({"canonical"})
    provides = frozenset({"cast"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        if self.dtype not in STORAGE_DTYPES:
            raise BitsmithError(f"unsupported weight dtype {self.dtype!r}", where=f"pass {self.name}",
                                fix=f"use one of {STORAGE_DTYPES}")
        target = numpy_dtype(self.dtype)
        weights = dict(module.weights)
        for name, ttype in module.weights.items():
            if ttype.dtype in STORAGE_DTYPES and ttype.dtype != self.dtype:
                # go through float32 so bf16 <-> f16 conversions round once from the exact value
                ctx.weights[name] = np.asarray(ctx.weights[name], dtype=np.float32).astype(target)
                weights[name] = TensorType(ttype.shape, self.dtype)
        return module.with_weight_types(weights)

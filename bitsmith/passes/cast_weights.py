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
CAST_CHUNK_ELEMENTS = 8 << 20
# online rotation factors (passes/rotation_sites.py) stay float32: tiny, and their orthogonality is the point
KEEP_FLOAT32_PREFIX = "rotation."


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
            if ttype.dtype in STORAGE_DTYPES and ttype.dtype != self.dtype and not name.startswith(KEEP_FLOAT32_PREFIX):
                if name in ctx.weights and name not in ctx.quantized:  # quantized ones are already packed
                    cast_rows(ctx, name, target)
                weights[name] = TensorType(ttype.shape, self.dtype)
        return module.with_weight_types(weights)


def cast_rows(ctx: PassContext, name: str, target: np.dtype) -> None:
    """Cast one weight a chunk of rows at a time (an 8B model's embedding is 2 GB in fp32); through float32,
    so bf16 <-> f16 conversions round once from the exact value."""
    shape = ctx.weights.shape(name)
    if len(shape) < 2:
        ctx.weights[name] = np.asarray(ctx.weights[name], dtype=np.float32).astype(target)
        return
    step = max(1, CAST_CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:]))))
    with ctx.weights.writer(name, shape, target) as writer:
        for start in range(0, shape[0], step):
            rows = ctx.weights.read_rows(name, start, min(start + step, shape[0]))
            writer.write(np.asarray(rows, dtype=np.float32).astype(target))

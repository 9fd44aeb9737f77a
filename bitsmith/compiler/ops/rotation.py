"""The online rotation op: `hadamard(x[, factor])`, an orthogonal transform of x's last axis that no weight absorbs.

The rotate passes fold most rotations into weights; the ones that sit between two nonlinear steps (before
down_proj, after silu*up; on q and k after RoPE, so the KV cache holds rotated keys) run at inference time.
Definition (runtime/hadamard.py): n = x.shape[-1] = p * m, p a power of two, factor an m x m orthonormal
matrix (absent: m = 1); y = x @ (H_p (x) factor) / sqrt(p).
"""

from __future__ import annotations

from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.ops.registry import COMPUTE_DTYPE, as_float, check, register
from bitsmith.runtime.hadamard import hadamard_transform, is_power_of_two


def _hadamard_infer(in_types, attrs, weights):
    x = in_types[0]
    n = x.shape[-1]
    check(isinstance(n, int), f"hadamard needs a static last axis, got {x.shape}")
    m = 1
    if len(in_types) == 2:
        factor = in_types[1]
        check(factor.rank == 2 and factor.shape[0] == factor.shape[1] and isinstance(factor.shape[0], int),
              f"hadamard factor must be a square [m, m] matrix, got {factor.shape}")
        m = factor.shape[0]
    check(n % m == 0 and is_power_of_two(n // m), f"hadamard: last axis {n} is not a power of two times {m}")
    return [TensorType(x.shape, COMPUTE_DTYPE)]


def _hadamard_ref(xs, attrs, ctx):
    return [hadamard_transform(as_float(xs[0]), as_float(xs[1]) if len(xs) == 2 else None)]


register("hadamard", (1, 2), _hadamard_infer, _hadamard_ref)

"""Scalar-operand and slice kernels against the numpy references of the IR ops (add/sub/mul/div with a const,
tanh, slice), built for the host; the CUDA definitions are checked where the GPU kernels are (test_gpu_kernels).

Tolerances: a scalar op is one float32 rounding per element, as numpy's, so EXACT (rtol 1e-6); a slice is a copy,
compared bit for bit; tanh is the CPU kernels' polynomial (abs error ~1e-7), TRANSCENDENTAL as for silu/gelu.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bitsmith.codegen.common import PARALLEL_MIN
from bitsmith.codegen.elementwise import UnarySpec
from bitsmith.codegen.kernel import call_kernel
from bitsmith.codegen.scalar_slice import ScalarSpec, SliceSpec
from bitsmith.compiler.ops import OPS
from bitsmith.errors import BitsmithError

EXACT = dict(rtol=1e-6, atol=0)
TRANSCENDENTAL = dict(rtol=1e-4, atol=1e-6)
BIG = PARALLEL_MIN + 7232


def ref(op: str, inputs: list[np.ndarray], **attrs) -> np.ndarray:
    return OPS[op].ref(inputs, attrs, None)[0]


def rng_for(spec) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(spec.name.encode()))


SCALAR_SPECS = [ScalarSpec(n, op, c, first) for n in (1, 7, 576, BIG) for op in ("add", "sub", "mul", "div")
                for c, first in ((8.0, False), (0.125, True))] + [ScalarSpec(65, "mul", 24.0 ** -0.5)]


@pytest.mark.parametrize("spec", SCALAR_SPECS, ids=lambda s: s.name)
def test_scalar_op_equals_the_binary_reference_with_a_const(spec):
    x = rng_for(spec).standard_normal(spec.n).astype(np.float32) + 3.0  # away from 0: c / x stays finite
    y = call_kernel(spec, [x], [np.full(spec.n, np.nan, np.float32)])[0]
    c = np.float32(spec.value)
    args = [c, x] if spec.const_first else [x, c]
    np.testing.assert_allclose(y, ref(spec.op, args), **EXACT)


@pytest.mark.parametrize("n", (7, 576, BIG))
def test_tanh(n):
    x = np.linspace(-12, 12, n, dtype=np.float32)
    y = call_kernel(UnarySpec(n, "tanh"), [x], [np.full(n, np.nan, np.float32)])[0]
    np.testing.assert_allclose(y, np.tanh(x), **TRANSCENDENTAL)


# (input shape, axis, start, end, step): fused qkv [seq, 3*d] split along the last axis, GPT-NeoX's per-head
# [seq, heads, 3*d], a middle axis, a strided pick, one row of many
SLICES = [((5, 192), 1, 64, 128, 1), ((3, 4, 48), 2, 16, 32, 1), ((2, 6, 8), 1, 2, 6, 1), ((4, 12), 1, 1, 12, 3),
          ((64, 256), 1, 0, 128, 1), ((1, 9), 1, 8, 9, 1)]


@pytest.mark.parametrize("shape,axis,start,end,step", SLICES)
def test_slice_copies_exactly_what_the_reference_selects(shape, axis, start, end, step):
    x = np.random.default_rng(len(shape) + start).standard_normal(shape).astype(np.float32)
    want = ref("slice", [x], axis=axis, start=start, end=end, step=step)
    outer, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    spec = SliceSpec(outer, shape[axis], inner, start, want.shape[axis], step)
    got = call_kernel(spec, [x.reshape(outer, shape[axis], inner)],
                      [np.full((outer, want.shape[axis], inner), np.nan, np.float32)])[0]
    assert np.array_equal(got.reshape(want.shape), want)


def test_specs_refuse_what_they_cannot_compute():
    with pytest.raises(BitsmithError, match="op 'pow'"):
        ScalarSpec(4, "pow", 2.0)
    with pytest.raises(BitsmithError, match="slice"):
        SliceSpec(1, 8, 1, 6, 3)  # elements 6, 7, 8: past the end

"""The 16-row interleaved int8-activation matmul (QGemvX16Spec) against the exact int8 oracle of
test_gemv_int8.py (same activation quantization, integer dot products, fp64 scaling): it reads the same
codes, only laid out by runtime/interleave.py, so it must give the same numbers to fp32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.codegen.gemv_x16 import QGemvX16Spec, x16_problems
from bitsmith.codegen.target import host_target
from bitsmith.errors import BitsmithError
from bitsmith.runtime.interleave import interleave_codes, interleave_rows
from bitsmith.runtime.packed_layout import unpack
from test_gemv_int8 import case, exact_reference

pytestmark = pytest.mark.skipif(not host_target().supports_int8_activations, reason="host lacks AVX-512 VNNI")

# SmolLM2's shapes at 1/16 rows, both bit widths, sym and asym, groups 32..per channel, tiles of 1..16
# rows (5: five 1-row tiles, 48: three of 16, 64: four), int8 per channel
SPECS = [QGemvX16Spec(1536, 576, 4, 32, True, 16), QGemvX16Spec(576, 1536, 4, 32, True, 1),
         QGemvX16Spec(192, 576, 4, 32, False, 16), QGemvX16Spec(48, 576, 4, 64, True, 5),
         QGemvX16Spec(32, 1024, 4, 128, False, 48), QGemvX16Spec(16, 96, 4, -1, True, 64),
         QGemvX16Spec(64, 576, 8, 32, True, 16), QGemvX16Spec(32, 576, 8, -1, False, 3),
         QGemvX16Spec(16, 64, 8, 32, False, 1)]


@pytest.fixture(scope="module")
def module(host_kernels):
    """Every kernel of this file in one library, built through the kernel cache."""
    return host_kernels(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_matches_the_exact_int8_reference(module, spec):
    import tvm

    same = QGemvI8Spec(spec.out_features, spec.in_features, spec.bits, spec.group_size, spec.sym, spec.batch)
    x, qweight, scales, zeros = case(same, seed=spec.batch)
    codes = interleave_codes(unpack(qweight, spec.bits, spec.in_features), spec.bits).reshape(-1)
    params = [interleave_rows(scales).reshape(-1)] + ([] if zeros is None else [interleave_rows(zeros).reshape(-1)])
    y = tvm.runtime.tensor(np.full((spec.batch, spec.out_features), np.nan, np.float32))
    module[spec.name](*(tvm.runtime.tensor(a) for a in (x, codes, *params)), y)
    want = exact_reference(same, x, qweight, scales, zeros)
    assert np.abs(y.numpy() - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("shape, why", [((24, 64, 4, 32), "multiple of 16"), ((16, 48, 4, 32), "multiple of 32"),
                                         ((16, 96, 4, 64), "group size 64"), ((16, 64, 3, 32), "bits 3")])
def test_shapes_it_cannot_lay_out_are_refused(shape, why):
    assert any(why in p for p in x16_problems(*shape))
    with pytest.raises(BitsmithError, match="QGemvI8Spec"):
        QGemvX16Spec(*shape, True, 1)


def test_names_tell_every_field_apart():
    base = dict(out_features=64, in_features=576, bits=4, group_size=32, sym=True, batch=16)
    changes = [{}, {"out_features": 32}, {"in_features": 1536}, {"bits": 8}, {"group_size": -1}, {"sym": False},
               {"batch": 1}]
    assert len({QGemvX16Spec(**{**base, **c}).name for c in changes}) == len(changes)

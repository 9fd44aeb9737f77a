"""The 16-row interleaved weight layout: bit-exact both ways, and the plan's weight names resolve to it."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.passes.quant.packing import pack
from bitsmith.runtime.interleave import (deinterleave_codes, interleave_codes, interleave_rows, kernel_weight,
                                         x16_name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(16, 32), (48, 576), (32, 1536)])
def test_interleave_then_deinterleave_is_bit_exact(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, shape, dtype=np.uint8)
    packed = interleave_codes(codes, bits)
    assert packed.shape == (shape[0] // 16, shape[1] // 32, 16 * 32 * bits // 8)
    np.testing.assert_array_equal(deinterleave_codes(packed, bits), codes)


def test_byte_positions_follow_the_documented_layout():
    codes = np.random.default_rng(1).integers(0, 16, (32, 64), dtype=np.uint8)
    packed = interleave_codes(codes, 4)
    g, b, v, o, t = 1, 1, 2, 5, 3  # row 16 g + o, inputs 32 b + 8 v + t (low) and + 4 (high)
    byte = packed[g, b, 64 * v + 4 * o + t]
    assert byte & 15 == codes[16 * g + o, 32 * b + 8 * v + t] and byte >> 4 == codes[16 * g + o, 32 * b + 8 * v + 4 + t]
    codes8 = np.random.default_rng(2).integers(0, 256, (16, 64), dtype=np.uint8)
    assert interleave_codes(codes8, 8)[0, 1, 64 * 7 + 4 * 9 + 2] == codes8[9, 32 + 28 + 2]


def test_plan_names_resolve_from_the_artifacts_packed_weights():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (32, 576), dtype=np.uint8)
    scales = rng.random((32, 18)).astype(np.float16)
    weights = {"w.qweight": pack(codes, 4), "w.scales": scales}
    got = kernel_weight(x16_name("w.qweight", 4, 576), weights)
    np.testing.assert_array_equal(got, interleave_codes(codes, 4).reshape(-1))
    np.testing.assert_array_equal(kernel_weight(x16_name("w.scales"), weights), interleave_rows(scales).reshape(-1))
    assert kernel_weight("w.scales", weights) is scales
    assert interleave_rows(scales)[1, 17, 3] == scales[19, 17]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_f,in_f", [(16, 128), (48, 256), (32, 384), (64, 1024)])
def test_interleave_packed_equals_unpack_then_interleave(bits, out_f, in_f):
    """The loader's direct path from packed words gives the same bytes as unpacking to codes first."""
    from bitsmith.passes.quant.packing import pack
    from bitsmith.runtime.interleave import interleave_packed

    codes = np.random.default_rng(bits * out_f + in_f).integers(0, 1 << bits, (out_f, in_f)).astype(np.uint8)
    np.testing.assert_array_equal(interleave_packed(pack(codes, bits), bits, in_f), interleave_codes(codes, bits))


@pytest.mark.parametrize("bits,out_f,in_f", [(4, 16, 576), (8, 16, 96), (4, 8, 128), (3, 16, 512)])
def test_interleave_packed_declines_partial_blocks(bits, out_f, in_f):
    from bitsmith.passes.quant.packing import pack
    from bitsmith.runtime.interleave import interleave_packed

    codes = np.zeros((out_f, in_f), dtype=np.uint8)
    assert interleave_packed(pack(codes, bits), bits, in_f) is None  # the loader then unpacks first

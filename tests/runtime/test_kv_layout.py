"""The int4 KV storage (runtime/kv_layout.py) and kv_storage_round's int4 reference: round-trip properties."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.ops.llm import kv_storage_round
from bitsmith.compiler.ops.registry import infer_types
from bitsmith.errors import BitsmithError
from bitsmith.runtime.kv_layout import (int4_dequantize, int4_quantize, pack_int4, pool_bytes, pool_storage,
                                        token_bytes, unpack_int4)


def _rows(seed: int = 0) -> np.ndarray:
    """[seq 7, kv_heads 3, head_dim 64] with an outlier channel, a constant row and an all-zero row."""
    x = np.random.default_rng(seed).standard_normal((7, 3, 64)).astype(np.float32)
    x[:, 1, 5] *= 40
    x[2, 0] = -1.25
    x[4, 2] = 0
    return x


def test_pack_unpack_round_trip_and_nibble_order():
    codes = np.random.default_rng(1).integers(0, 16, (5, 2, 32)).astype(np.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 2, 16) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed), codes)
    assert pack_int4(np.array([3, 12], np.uint8))[0] == 3 | 12 << 4  # element 0 low nibble, element 1 high


def test_int4_codes_cover_the_row_and_err_by_at_most_half_a_step():
    x = _rows()
    codes, scales = int4_quantize(x)
    step, low = scales[..., 0], scales[..., 1]
    assert codes.dtype == np.uint8 and codes.max() <= 15 and scales.shape == (7, 3, 2)
    np.testing.assert_array_equal(low, x.min(-1))
    moving = x.max(-1) > x.min(-1)
    assert (codes.min(-1)[moving] == 0).all() and (codes.max(-1)[moving] == 15).all()  # both ends are levels
    back = int4_dequantize(codes, scales)
    err = np.abs(back - x)
    assert (err <= step[..., None] * (0.5 + 1e-5)).all()
    np.testing.assert_array_equal(back[2, 0], x[2, 0])  # a constant row: step 1, every code 0, exact
    np.testing.assert_array_equal(back[4, 2], 0)
    assert step[2, 0] == 1 and step[4, 2] == 1 and not codes[2, 0].any()


def test_kv_storage_round_int4_is_the_kernel_rounding_and_idempotent():
    x = _rows(2)
    once = kv_storage_round(x, "int4")
    np.testing.assert_array_equal(once, int4_dequantize(*int4_quantize(x)))
    assert once.shape == x.shape and once.dtype == np.float32
    np.testing.assert_allclose(kv_storage_round(once, "int4"), once, rtol=0, atol=1e-5 * np.abs(x).max())
    gauss = x[:, 0]  # (head 0: no outlier channel)
    err4 = np.abs(once[:, 0] - gauss).mean()
    err8 = np.abs(kv_storage_round(x, "int8")[:, 0] - gauss).mean()
    assert 5 * err8 < err4 < 0.15 * np.abs(gauss).mean()  # 16 levels: much coarser than int8, still close
    # asymmetric: a row of positive values uses all 16 levels over [min, max], a symmetric code half of them
    pos = np.abs(x) + 1
    assert np.abs(kv_storage_round(pos, "int4") - pos).max() < np.abs(pos).max() / 15


def test_pool_layouts_and_bytes():
    shape = (10, 2, 16, 3, 64)
    assert pool_storage("int4", shape) == ((10, 2, 16, 3, 32), "uint8", (10, 2, 16, 3, 2))
    assert pool_storage("int8", shape) == (shape, "int8", (10, 2, 16, 3))
    assert pool_storage("float16", shape) == (shape, "float16", None)
    assert token_bytes("int4", 3, 64) == 2 * 3 * (32 + 8) and token_bytes("int8", 3, 64) == 2 * 3 * (64 + 4)
    assert pool_bytes("float16", shape) == 10 * 2 * 16 * 3 * 64 * 2
    with pytest.raises(ValueError, match="head_dim 15 must be even"):
        pool_storage("int4", (1, 2, 16, 1, 15))


def test_the_attention_op_accepts_int4_and_refuses_an_odd_head_dim():
    def types(d):
        row, cache = TensorType((4, 2, d), "float32"), TensorType((2, 2, 32, 2, d), "float32")
        return [TensorType((4, 4, d), "float32"), row, row, TensorType((4,), "int64"), cache]

    attrs = {"layer": 1, "scale": 0.25, "kv_dtype": "int4"}
    assert infer_types("attention", types(16), attrs, {}, "layers.1.attn")[0].shape == (4, 4, 16)
    with pytest.raises(BitsmithError, match="int4 KV needs an even head_dim"):
        infer_types("attention", types(15), attrs, {}, "layers.1.attn")

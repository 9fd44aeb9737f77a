"""Round-to-nearest: half-step error bound, partial groups, and a scalar per-group reference."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.runtime.quant_scheme import QuantScheme, dequantize, group_index


def _weights(out_f: int, in_f: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)) * 0.05
    w[:, rng.choice(in_f, 3)] *= 20  # outlier columns stretch some groups' ranges
    return w.astype(np.float32)


def _fp16_at_least(v: float) -> np.float16:
    h = np.float16(v)
    return h if float(h) >= v else np.nextafter(h, np.float16(np.inf))


def _reference(w: np.ndarray, scheme: QuantScheme):
    """The documented formulas, one group at a time with Python scalars."""
    out_f, in_f = w.shape
    g = in_f if scheme.group_size == -1 else scheme.group_size
    n_groups = -(-in_f // g)
    q = np.zeros(w.shape, np.uint8)
    scales = np.zeros((out_f, n_groups), np.float16)
    zeros = np.zeros((out_f, n_groups), np.float16)
    half, qmax = 2 ** (scheme.bits - 1), 2 ** scheme.bits - 1
    for r in range(out_f):
        for gi in range(n_groups):
            seg = w[r, gi * g:(gi + 1) * g].astype(np.float64)
            if scheme.sym:
                hi, lo = max(float(seg.max()), 0.0), min(float(seg.min()), 0.0)
                s = max(hi / (half - 1), -lo / half)
            else:  # the group's own range, no widening to include 0
                hi, lo = float(seg.max()), float(seg.min())
                s = (hi - lo) / qmax
            s16 = _fp16_at_least(np.float32(s)) if s > 0 else np.float16(1)
            sf = float(s16)
            z = half if scheme.sym else float(np.float16(np.float32(-lo) / np.float32(sf)))
            scales[r, gi], zeros[r, gi] = s16, z
            for c, v in enumerate(seg):
                code = round(float(np.float32(v) / np.float32(sf) + np.float32(z)))
                q[r, gi * g + c] = min(max(code, 0), qmax)
    return q, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_scalar_reference(bits, group, sym):
    w = _weights(4, 200)  # 200 = 6*32 + 8 and 128 + 72: partial last groups
    scheme = QuantScheme(bits, group, sym, "rtn")
    qw = quantize_rtn(w, scheme)
    q, scales, zeros = _reference(w, scheme)
    np.testing.assert_array_equal(qw.scales, scales)
    if sym:
        assert qw.zeros is None
    else:
        np.testing.assert_array_equal(qw.zeros, zeros)
    np.testing.assert_array_equal(qw.q, q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f", [576, 130])
def test_error_at_most_half_a_step(bits, group, sym, in_f):
    w = _weights(16, in_f, seed=bits)
    scheme = QuantScheme(bits, group, sym, "rtn")
    qw = quantize_rtn(w, scheme)
    assert qw.q.max() <= 2 ** bits - 1 and qw.scales.dtype == np.float16
    step = qw.scales.astype(np.float32)[:, group_index(in_f, scheme)]
    err = np.abs(w - dequantize(qw))
    # asym: z is stored as fp16, which can move the grid by up to half an fp16 ulp of z (in steps)
    z_ulp = 0.0 if sym else np.spacing(np.abs(qw.zeros)).astype(np.float32)[:, group_index(in_f, scheme)]
    assert np.all(err <= step * (0.5 + 1e-5 + z_ulp / 2))
    # and the bound is not vacuous: the worst error is close to half a step somewhere
    assert np.max(err / step) > 0.4


def test_partial_last_group_is_independent_of_the_others():
    scheme = QuantScheme(4, 128, False, "rtn")
    w = _weights(3, 576)
    base = quantize_rtn(w, scheme)
    assert base.scales.shape == (3, 5)
    w2 = w.copy()
    w2[:, :512] *= 7  # only the four full groups change
    other = quantize_rtn(w2, scheme)
    np.testing.assert_array_equal(other.scales[:, 4], base.scales[:, 4])
    np.testing.assert_array_equal(other.q[:, 512:], base.q[:, 512:])
    w3 = w.copy()
    w3[:, 575] = 10.0  # an outlier in the partial group rescales only that group
    third = quantize_rtn(w3, scheme)
    np.testing.assert_array_equal(third.scales[:, :4], base.scales[:, :4])
    assert np.all(third.scales[:, 4] > base.scales[:, 4])


def test_symmetric_uses_the_extra_negative_code():
    scheme = QuantScheme(4, -1, True, "rtn")
    w = np.array([[-8.0, 7.0, 1.0, 0.0], [8.0, -1.0, 0.5, 0.0]], np.float32)
    qw = quantize_rtn(w, scheme)
    # row 0 fits [-8, 7] with s = 1 exactly (code 0 is -8); row 1 needs s = 8/7 to reach +8
    assert float(qw.scales[0, 0]) == 1.0 and qw.q[0, 0] == 0 and qw.q[0, 1] == 15
    assert float(qw.scales[1, 0]) >= 8 / 7 and qw.q[1, 0] == 15
    np.testing.assert_array_equal(dequantize(qw)[0], w[0])


def test_zero_rows_and_clipping():
    w = _weights(4, 64)
    w[1] = 0.0
    scheme = QuantScheme(3, 32, False, "rtn")
    qw = quantize_rtn(w, scheme)
    assert np.all(dequantize(qw)[1] == 0)
    clipped = quantize_rtn(w, scheme, clip_ratio=np.full((4, 2), 0.5, np.float32))
    live = [0, 2, 3]  # row 1 is all zero and keeps the placeholder scale 1
    # asym clip limits both ends to +-(ratio * absmax): range <= 2 * 0.5 * absmax
    absmax = np.abs(w.reshape(4, 2, 32)).max(axis=2)[live]
    got = clipped.scales[live].astype(np.float32)
    assert np.all(got <= absmax / scheme.qmax + 1e-3)
    assert np.all(got <= qw.scales[live].astype(np.float32) + 1e-6) and np.any(got < qw.scales[live].astype(np.float32))
    with pytest.raises(BitsmithError, match="clip_ratio"):
        quantize_rtn(w, scheme, clip_ratio=np.ones((4, 3)))
    with pytest.raises(BitsmithError, match="NaN"):
        quantize_rtn(np.full((2, 32), np.nan), scheme)

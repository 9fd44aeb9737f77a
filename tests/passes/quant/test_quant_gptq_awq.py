"""GPTQ and AWQ on synthetic layers: agreement with a naive reference, and lower output error than RTN."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.awq import _rtn_roundtrip, quantize_awq, search_awq_clip, search_awq_scales
from bitsmith.passes.quant.gptq import HessianAccumulator, accumulate_hessian, gptq_factor, quantize_gptq
from bitsmith.passes.quant.rtn import group_params, quantize_rtn
from bitsmith.runtime.quant_scheme import QuantScheme, dequantize


def _layer(seed: int, out_f: int = 160, in_f: int = 320, tokens: int = 3072):
    """w [out, in] and x [tokens, in]: correlated inputs (low rank + noise) with a few channels
    20-60x larger than the rest, the pattern LLM activations show after RMSNorm."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, 24)) @ rng.standard_normal((24, in_f)) * 0.4
    x += rng.standard_normal((tokens, in_f))
    x[:, rng.choice(in_f, 6, replace=False)] *= rng.uniform(20, 60, 6)
    w = rng.standard_normal((out_f, in_f)) * 0.05
    return w.astype(np.float32), x.astype(np.float32)


def _output_error(w: np.ndarray, w_hat: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w.T - x @ w_hat.T))


def _naive_gptq(w, h, scheme, damp, order, block_params):
    """Optimal-brain-quantization updates with the full inverse Hessian, no blocks, no Cholesky:
    quantize column i, spread its error with H^-1[i, :] / H^-1[i, i], remove i from H^-1."""
    w = w.astype(np.float64).copy()
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    h_inv = np.linalg.inv(h)
    g = w.shape[1] if scheme.group_size == -1 else scheme.group_size
    scales, zeros = block_params
    q = np.zeros(w.shape, np.uint8)
    for col in order:
        if scales is None and col % g == 0:  # dynamic groups, from the current weights
            s_grp, z_grp = group_params(w[:, col:col + g].astype(np.float32), QuantScheme(
                scheme.bits, -1, scheme.sym, "rtn"))
            cur_s, cur_z = s_grp[:, 0], z_grp
        s = (scales[:, col // g] if scales is not None else cur_s).astype(np.float64)
        if scheme.sym:
            z = 2 ** (scheme.bits - 1)
        else:
            z = (zeros[:, col // g] if scales is not None else cur_z[:, 0]).astype(np.float64)
        q[:, col] = np.clip(np.rint(w[:, col] / s + z), 0, scheme.qmax)
        err = (w[:, col] - (q[:, col].astype(np.float64) - z) * s) / h_inv[col, col]
        w -= np.outer(err, h_inv[col])
        h_inv -= np.outer(h_inv[:, col], h_inv[col]) / h_inv[col, col]
    return q


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, False, "gptq"), QuantScheme(3, -1, True, "gptq")])
def test_gptq_matches_naive_reference(act_order, scheme):
    w, x = _layer(1, out_f=24, in_f=80, tokens=400)
    h, _ = accumulate_hessian(None, x, 0)
    got = quantize_gptq(w, h, scheme, act_order=act_order, block_size=24)  # lazy updates across blocks
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(80)
    static = act_order or scheme.group_size == -1
    params = group_params(w, scheme) if static else (None, None)
    want = _naive_gptq(w, h, scheme, 0.01, order, params)
    # float32 blocks vs float64 reference: allow a rare rounding tie to fall the other way
    assert np.mean(got.q != want) < 0.005


def test_gptq_with_identity_hessian_is_rtn():
    w, _ = _layer(2, out_f=16, in_f=96)
    scheme = QuantScheme(4, 32, False, "gptq")
    np.testing.assert_array_equal(quantize_gptq(w, np.eye(96), scheme).q, quantize_rtn(w, scheme).q)


def test_gptq_dead_columns_and_bad_input():
    w, x = _layer(3, out_f=8, in_f=64, tokens=256)
    x[:, 5] = 0.0
    h, _ = accumulate_hessian(None, x, 0)
    qw = quantize_gptq(w, h, QuantScheme(4, 32, True, "gptq"))
    assert np.all(dequantize(qw)[:, 5] == 0)
    with pytest.raises(BitsmithError, match="Hessian has shape"):
        quantize_gptq(w, np.eye(63), QuantScheme(4, 32, True, "gptq"))


def test_streaming_hessian_equals_one_shot():
    _, x = _layer(4, in_f=48, tokens=300)
    h, n = None, 0
    for a, b in [(0, 7), (7, 150), (150, 151), (151, 300)]:
        h, n = accumulate_hessian(h, x[a:b], n)
    assert n == 300
    np.testing.assert_allclose(h, 2.0 / 300 * x.astype(np.float64).T @ x, rtol=1e-10)


SCHEMES = [QuantScheme(b, g, sym, "rtn") for b in (4, 3) for g in (32, 128, -1) for sym in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_gptq_and_awq_beat_rtn_on_held_out_tokens(scheme):
    w, x = _layer(5)
    calib, held_out = x[:2560], x[2560:]
    rtn = _output_error(w, dequantize(quantize_rtn(w, scheme)), held_out)
    h, _ = accumulate_hessian(None, calib, 0)
    gptq = _output_error(w, dequantize(quantize_gptq(w, h, scheme)), held_out)
    s = search_awq_scales([w], calib, scheme)
    awq = _output_error(w, dequantize(quantize_awq(w, calib, scheme, s)) / s, held_out)
    assert gptq < 0.8 * rtn, (gptq / rtn, awq / rtn)
    assert awq < 0.8 * rtn, (gptq / rtn, awq / rtn)


def test_awq_scales_shared_by_several_linears():
    rng = np.random.default_rng(6)
    w_q, x = _layer(6, out_f=64, in_f=128, tokens=512)
    w_k, w_v = (rng.standard_normal((32, 128)).astype(np.float32) * 0.05 for _ in range(2))
    scheme = QuantScheme(3, 32, True, "awq")
    s = search_awq_scales([w_q, w_k, w_v], x, scheme, grid=10)
    assert s.shape == (128,) and s.dtype == np.float32 and np.all(s > 0)
    loud = np.argsort(np.abs(x).mean(axis=0))[-6:]
    assert np.all(s[loud] > np.median(s))  # the outlier channels are the protected ones

    def total(scale):
        return sum(_output_error(w, dequantize(quantize_rtn(w * scale, scheme)) / scale, x) ** 2
                   for w in (w_q, w_k, w_v))
    assert total(s) < total(np.ones(128, np.float32))


def test_awq_clip_search_never_hurts_calibration_error():
    w, x = _layer(7, out_f=48, in_f=200, tokens=512)
    for scheme in (QuantScheme(3, 32, False, "awq"), QuantScheme(4, 128, True, "awq")):
        ratios = search_awq_clip(w, x, scheme)
        assert ratios.shape == (48, scheme.n_groups(200))
        assert np.all((ratios > 0.5) & (ratios <= 1.0)) and np.any(ratios < 1.0)
        clipped = _output_error(w, dequantize(quantize_rtn(w, scheme, clip_ratio=ratios)), x)
        assert clipped < _output_error(w, dequantize(quantize_rtn(w, scheme)), x)


def test_awq_rejects_bad_scales():
    w, x = _layer(8, out_f=8, in_f=64, tokens=64)
    with pytest.raises(BitsmithError, match="AWQ scales"):
        quantize_awq(w, x, QuantScheme(4, 32, True, "awq"), np.ones(63))
    with pytest.raises(BitsmithError, match="activations"):
        search_awq_scales([w], x[:, :10], QuantScheme(4, 32, True, "awq"))


def test_chunked_hessian_matches_float64_sum():
    """The pass's accumulator (float32 products of buffered chunks, float64 sum) against the exact float64 H."""
    _, x = _layer(9, in_f=64, tokens=700)
    acc = HessianAccumulator(64, chunk=128)
    for a, b in [(0, 5), (5, 300), (300, 301), (301, 700)]:  # chunks fill across calls and one call spans several
        acc.add(x[a:b])
    assert acc.n == 700
    want = 2.0 / 700 * x.astype(np.float64).T @ x
    d = np.sqrt(np.diag(want))
    # float32 products: each entry within 1e-6 of its natural scale sqrt(H_ii H_jj) (cancellation makes a
    # small off-diagonal entry relatively worse, so a plain rtol would be the wrong test)
    assert np.all(np.abs(acc.result() - want) <= 1e-6 * np.outer(d, d))
    with pytest.raises(BitsmithError, match="features"):
        HessianAccumulator(64).add(x[:, :10])


def test_gptq_factor_shared_and_row_chunks_give_the_same_codes():
    """One factor serves several weights, and sweeping row chunks on threads is the one-thread sweep exactly."""
    w, x = _layer(10, out_f=600, in_f=96, tokens=800)
    h, _ = accumulate_hessian(None, x, 0)
    for scheme, act_order in [(QuantScheme(4, 32, True, "gptq"), True), (QuantScheme(4, 32, False, "gptq"), False)]:
        alone = quantize_gptq(w, h, scheme, act_order=act_order, threads=1)
        factor = gptq_factor(h, 0.01, act_order)
        split = quantize_gptq(w, None, scheme, factor=factor, threads=2)  # 2 chunks of 300 rows
        np.testing.assert_array_equal(split.q, alone.q)
        np.testing.assert_array_equal(split.scales, alone.scales)
        if not scheme.sym:
            np.testing.assert_array_equal(split.zeros, alone.zeros)
    with pytest.raises(BitsmithError, match="factor is for 96 inputs"):
        quantize_gptq(w[:, :64], None, QuantScheme(4, 32, True, "gptq"), factor=factor)


def test_inverse_factor_is_the_upper_cholesky_of_the_damped_inverse():
    _, x = _layer(11, in_f=48, tokens=300)
    x[:, 7] = 0.0  # a dead input
    h, _ = accumulate_hessian(None, x, 0)
    f = gptq_factor(h, 0.01, act_order=True)
    hd = h.copy()
    hd[7, 7] = 1.0
    hd[np.diag_indices(48)] += 0.01 * np.mean(np.diag(hd))
    hp = hd[np.ix_(f.perm, f.perm)]
    want = np.linalg.cholesky(np.linalg.inv(hp)).T
    np.testing.assert_allclose(f.u, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert f.dead[7] and f.dead.sum() == 1


def test_rtn_roundtrip_is_dequantize_of_rtn():
    w, _ = _layer(12, out_f=40, in_f=200)
    for scheme in (QuantScheme(4, 32, False, "awq"), QuantScheme(3, 64, True, "awq"), QuantScheme(4, -1, True, "awq")):
        for ratio in (1.0, 0.8):
            np.testing.assert_array_equal(_rtn_roundtrip(w, scheme, ratio),
                                          dequantize(quantize_rtn(w, scheme, clip_ratio=ratio)))

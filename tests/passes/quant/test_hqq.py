"""HQQ: never worse than RTN group by group, better on weights and outputs, fp16 parameters the codes agree with,
the packed round trip, and a tiny model compiled with `--method hqq` that runs."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.hqq import (
    HqqOptions,
    quantize_calibration_free,
    quantize_hqq,
    shrink_lp,
)
from bitsmith.passes.quant.packing import pack
from bitsmith.passes.quant.rtn import quantize_rtn, quantize_with_params
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.packed_layout import unpack
from bitsmith.runtime.quant_scheme import (
    QuantScheme,
    dequantize,
    group_index,
    parse_scheme,
)


def _weights(out_f: int = 96, in_f: int = 200, seed: int = 0) -> np.ndarray:
    """Heavy-tailed rows (Student t, 4 degrees of freedom) at a real layer's scale; 200 columns: partial groups."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, (out_f, in_f)) * 0.02).astype(np.float32)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def _group_mean_abs_error(w: np.ndarray, approx: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """[out, n_groups] mean |w - approx| per group."""
    gidx = group_index(w.shape[1], scheme)
    err = np.abs(w - approx).astype(np.float64)
    return np.stack([err[:, gidx == g].mean(axis=1) for g in range(gidx.max() + 1)], axis=1)


# (scheme, largest allowed HQQ/RTN ratio of the RMS weight error and of the RMS output error). Measured on these
# weights (weight/output): asym int4 g32 0.93/0.95, g64 0.94/0.94, int3 0.91/0.91, int2 0.80/0.80; sym int4 g32
# 0.98/0.99 (HQQ's lp objective is not L2: sym int4 g32 gains least), int3 0.94/0.91, int2 0.80/0.82, pc 0.93/0.93
CASES = [(QuantScheme(4, 32, False, "hqq"), 0.97), (QuantScheme(4, 64, False, "hqq"), 0.97),
         (QuantScheme(3, 32, False, "hqq"), 0.95), (QuantScheme(2, 32, False, "hqq"), 0.85),
         (QuantScheme(4, 32, True, "hqq"), 0.999), (QuantScheme(3, 32, True, "hqq"), 0.97),
         (QuantScheme(2, 32, True, "hqq"), 0.85), (QuantScheme(4, -1, True, "hqq"), 0.96)]


@pytest.mark.parametrize("scheme, ratio", CASES, ids=lambda c: c.short_name() if isinstance(c, QuantScheme) else "")
def test_beats_rtn_on_the_same_layer(scheme, ratio):
    w = _weights()
    x = np.random.default_rng(1).standard_normal((64, w.shape[1])).astype(np.float32)
    rtn = dequantize(quantize_rtn(w, QuantScheme(scheme.bits, scheme.group_size, scheme.sym, "rtn")))
    hqq = dequantize(quantize_hqq(w, scheme))
    assert _rms(w - hqq) < ratio * _rms(w - rtn)
    assert _rms(x @ (w - hqq).T) < ratio * _rms(x @ (w - rtn).T)
    # HQQ starts from RTN's parameters and keeps a group's best: no group's mean |error| may get worse
    worse = _group_mean_abs_error(w, hqq, scheme) - _group_mean_abs_error(w, rtn, scheme)
    assert worse.max() <= 1e-6 * np.abs(w).mean()


@pytest.mark.parametrize("scheme", [c for c, _ in CASES], ids=lambda c: c.short_name())
def test_codes_are_the_nearest_under_the_stored_fp16_parameters_and_pack_round_trips(scheme):
    w = _weights(40, 200, seed=2)
    qw = quantize_hqq(w, scheme)
    assert qw.scales.dtype == np.float16 and (qw.scales.astype(np.float32) > 0).all()
    assert (qw.zeros is None) == scheme.sym and qw.perm is None and qw.scheme == scheme
    # the codes are RTN's codes under the stored parameters: the kernels assume nothing else
    again = quantize_with_params(w, qw.scales, qw.zeros, scheme)
    np.testing.assert_array_equal(again.q, qw.q)
    np.testing.assert_array_equal(unpack(pack(qw.q, scheme.bits), scheme.bits, w.shape[1]), qw.q)


def test_rows_are_independent_so_chunking_changes_nothing(monkeypatch):
    from bitsmith.passes.quant import hqq

    w, scheme = _weights(50, 96, seed=3), QuantScheme(3, 32, False, "hqq")
    whole = quantize_hqq(w, scheme)
    monkeypatch.setattr(hqq, "CHUNK_ELEMENTS", 96 * 7)  # 7 rows per chunk, the last one short
    chunked = quantize_hqq(w, scheme)
    np.testing.assert_array_equal(whole.q, chunked.q)
    np.testing.assert_array_equal(whole.scales, chunked.scales)
    np.testing.assert_array_equal(whole.zeros, chunked.zeros)


def test_shrink_is_the_lp_proximal_step():
    x = np.array([-2.0, -0.05, 0.0, 0.05, 2.0], np.float32)
    got = shrink_lp(x, beta=10.0, p=0.7)
    want = np.sign(x) * np.maximum(np.abs(x) - np.power(np.abs(x) + 1e-8, -0.3) / 10.0, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == got[2] == got[3] == 0 and 0 < got[4] < 2  # small errors vanish, large ones shrink


def test_zero_iterations_is_rtn_and_constant_groups_stay_exact():
    w = _weights(8, 64, seed=4)
    w[0, :32] = 0.25  # a constant group: any scale, the zero alone carries the value
    for sym in (True, False):
        scheme = QuantScheme(4, 32, sym, "hqq")
        rtn = quantize_rtn(w, QuantScheme(4, 32, sym, "rtn"))
        none = quantize_hqq(w, scheme, HqqOptions(iters=0))
        np.testing.assert_array_equal(none.q, rtn.q)
        np.testing.assert_array_equal(none.scales, rtn.scales)
        assert np.abs(dequantize(quantize_hqq(w, scheme))[0, :32] - 0.25).max() <= 0.25 / 2 ** 11


def test_dispatch_and_scheme_strings():
    assert parse_scheme("int4-g32-hqq") == QuantScheme(4, 32, True, "hqq")
    assert parse_scheme("int3-g32-asym-hqq").name == "int3-g32-asym-hqq"
    w = _weights(8, 64)
    hqq = quantize_calibration_free(w, QuantScheme(4, 32, False, "hqq"))
    np.testing.assert_array_equal(hqq.q, quantize_hqq(w, QuantScheme(4, 32, False, "hqq")).q)
    with pytest.raises(BitsmithError, match="needs calibration data"):
        quantize_calibration_free(w, QuantScheme(4, 32, True, "gptq"))


def test_tiny_model_compiles_with_method_hqq_and_runs(tiny_llama_dir, tmp_path):
    """Through the CLI (--method hqq is a choice there); alone it takes ~15 s, nearly all importing torch (the
    session's tiny model) and TVM, which the rest of the suite imports anyway."""
    from click.testing import CliRunner

    from bitsmith.cli import main

    result = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(tmp_path / "art"), "--method",
                                       "hqq", "--bits", "4", "--group", "32", "--asym", "--no-keep-default",
                                       "--target", "none", "--gate", "none"])
    assert result.exit_code == 0, result.output
    art = load_artifact(tmp_path / "art")
    plan = art.manifest["ir"]["meta"]["precision_plan"]
    assert plan and all(QuantScheme.from_json(s).name == "int4-g32-asym-hqq" for s in plan.values() if s)
    module = Module.from_json(art.manifest["ir"])
    assert any(n.op == "qlinear" for n in module["decode"].nodes)
    session = ReferenceSession(module, art.weights, 16)
    logits = session.prefill([1, 5, 9, 17])
    assert logits.shape == (4, 96) and np.isfinite(logits).all()
    assert np.isfinite(session.decode(3)).all()

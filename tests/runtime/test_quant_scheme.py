"""QuantScheme validation and parsing, QuantizedWeight checks, dequantize and theoretical sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import (
    QuantizedWeight, QuantScheme, dequantize, group_index, parse_scheme, theoretical_bytes)


def test_parse_defaults_and_options():
    assert parse_scheme("int4") == QuantScheme(4, 128, True, "rtn")
    assert parse_scheme("int4-g32-asym") == QuantScheme(4, 32, False, "rtn")
    assert parse_scheme("int3-pc-gptq") == QuantScheme(3, -1, True, "gptq")
    assert parse_scheme("INT8-awq-asym-g64") == QuantScheme(8, 64, False, "awq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_name_and_json_round_trip(bits, group, sym, method):
    scheme = QuantScheme(bits, group, sym, method)
    assert parse_scheme(scheme.name) == scheme
    assert QuantScheme.from_json(scheme.to_json()) == scheme
    assert QuantScheme.from_json(json.dumps(scheme.to_json())) == scheme


@pytest.mark.parametrize("kwargs, bad", [
    (dict(bits=7, group_size=128, sym=True, method="rtn"), "7"),
    (dict(bits=16, group_size=128, sym=True, method="rtn"), "16"),
    (dict(bits=4, group_size=100, sym=True, method="rtn"), "100"),
    (dict(bits=4, group_size=0, sym=True, method="rtn"), "0"),
    (dict(bits=4, group_size=128, sym="yes", method="rtn"), "'yes'"),
    (dict(bits=4, group_size=128, sym=True, method="smoothquant"), "'smoothquant'"),
])
def test_bad_values_are_named(kwargs, bad):
    with pytest.raises(BitsmithError) as info:
        QuantScheme(**kwargs)
    assert bad in str(info.value)
    assert "use one of" in str(info.value)  # and the supported values are listed


@pytest.mark.parametrize("text, bad", [
    ("int7", "7"), ("int4-g100", "100"), ("int4-foo", "'foo'"), ("float4", "'float4'"),
    ("int4-sym-asym", "'asym'"), ("int4-g32-pc", "'pc'"), ("int4-gptq-awq", "'awq'"),
])
def test_bad_strings_are_named(text, bad):
    with pytest.raises(BitsmithError) as info:
        parse_scheme(text)
    assert bad in str(info.value)


def test_from_json_rejects_missing_and_extra_keys():
    with pytest.raises(BitsmithError, match="keys"):
        QuantScheme.from_json({"bits": 4, "group_size": 128, "sym": True})
    with pytest.raises(BitsmithError, match="keys"):
        QuantScheme.from_json({"bits": 4, "group_size": 128, "sym": True, "method": "rtn", "x": 1})


def test_groups_with_partial_last_group():
    scheme = QuantScheme(4, 128, True, "rtn")
    assert scheme.n_groups(576) == 5  # 4 full groups + one of 576 % 128 = 64 columns
    gidx = group_index(576, scheme)
    assert np.bincount(gidx).tolist() == [128, 128, 128, 128, 64]
    assert QuantScheme(4, -1, True, "rtn").n_groups(576) == 1


def test_dequantize_matches_a_scalar_loop():
    rng = np.random.default_rng(0)
    out_f, in_f, g = 3, 70, 32  # groups of 32, 32, 6
    scheme = QuantScheme(3, g, False, "rtn")
    q = rng.integers(0, 8, size=(out_f, in_f), dtype=np.uint8)
    scales = rng.uniform(0.01, 1, size=(out_f, 3)).astype(np.float16)
    zeros = rng.integers(0, 8, size=(out_f, 3)).astype(np.float16)
    got = dequantize(QuantizedWeight(q, scales, zeros, scheme, in_f))
    for r in range(out_f):
        for c in range(in_f):
            want = (float(q[r, c]) - float(zeros[r, c // g])) * float(scales[r, c // g])
            assert got[r, c] == pytest.approx(want, rel=1e-6)
    sym = QuantScheme(3, g, True, "rtn")
    got = dequantize(QuantizedWeight(q, scales, None, sym, in_f))
    assert got[1, 69] == pytest.approx((float(q[1, 69]) - 4) * float(scales[1, 2]), rel=1e-6)


def test_quantized_weight_checks_its_arrays():
    scheme = QuantScheme(4, 32, True, "rtn")
    q = np.zeros((2, 64), np.uint8)
    with pytest.raises(BitsmithError, match="scales"):
        QuantizedWeight(q, np.ones((2, 3), np.float16), None, scheme, 64)
    with pytest.raises(BitsmithError, match="zeros"):
        QuantizedWeight(q, np.ones((2, 2), np.float16), np.ones((2, 2), np.float16), scheme, 64)
    with pytest.raises(BitsmithError, match="uint8"):
        QuantizedWeight(q.astype(np.int32), np.ones((2, 2), np.float16), None, scheme, 64)


def test_theoretical_bytes():
    assert theoretical_bytes(576, 1536, parse_scheme("int4")) == 576 * 1536 / 2 + 2 * 576 * 12
    assert theoretical_bytes(1536, 576, parse_scheme("int3-asym")) == 3 * 1536 * 576 / 8 + 4 * 1536 * 5
    assert theoretical_bytes(10, 100, parse_scheme("int2-pc")) == 2 * 10 * 100 / 8 + 2 * 10


@pytest.mark.parametrize("text", ["int4-g32-min-s256-imported", "int6-g16-sym-s256", "int2-g16-min-s256",
                                  "int5-g32-min", "int8-g32-sym-imported"])
def test_imported_forms_round_trip(text):
    scheme = parse_scheme(text)
    assert parse_scheme(scheme.name) == scheme
    assert QuantScheme.from_json(scheme.to_json()) == scheme


@pytest.mark.parametrize("kwargs", [
    dict(bits=4, group_size=32, sym=True, method="rtn", offset=True),  # min form is asymmetric
    dict(bits=4, group_size=64, sym=True, method="rtn", super_group=256),  # K-quant groups are 16 or 32
    dict(bits=4, group_size=32, sym=False, method="rtn", super_group=256),  # z-form has no K-quant
    dict(bits=4, group_size=32, sym=True, method="rtn", super_group=128),
])
def test_impossible_forms_are_refused(kwargs):
    with pytest.raises(BitsmithError):
        QuantScheme(**kwargs)


def test_two_level_min_form_dequantizes_as_s_times_q_plus_m():
    rng = np.random.default_rng(0)
    out, n_in = 3, 512 + 64  # two super-groups, the second partial
    scheme = parse_scheme("int4-g32-min-s256-imported")
    q = rng.integers(0, 16, (out, n_in), dtype=np.uint8)
    sc = rng.integers(0, 64, (out, 18), dtype=np.int8)
    mn = rng.integers(0, 64, (out, 18), dtype=np.int8)
    d, dmin = rng.random((out, 3)).astype(np.float16), rng.random((out, 3)).astype(np.float16)
    qw = QuantizedWeight(q, sc, mn, scheme, n_in, super_scales=d, super_zeros=-dmin)
    w = dequantize(qw)
    o, c = 2, 300  # super-group 1, group 9
    s = np.float32(d[o, 1]) * np.float32(sc[o, 9])
    assert w[o, c] == s * np.float32(q[o, c]) - np.float32(dmin[o, 1]) * np.float32(mn[o, 9])


def test_perm_restores_the_source_column_order():
    rng = np.random.default_rng(1)
    scheme = parse_scheme("int4-g32-asym")
    q = rng.integers(0, 16, (4, 64), dtype=np.uint8)
    scales = rng.random((4, 2)).astype(np.float16)
    zeros = rng.integers(0, 16, (4, 2)).astype(np.float16)
    perm = rng.permutation(64).astype(np.int32)
    plain = dequantize(QuantizedWeight(q, scales, zeros, scheme, 64))
    permuted = dequantize(QuantizedWeight(q, scales, zeros, scheme, 64, perm=perm))
    assert np.array_equal(permuted[:, perm], plain)
    x = rng.standard_normal(64).astype(np.float32)
    np.testing.assert_allclose(permuted @ x, plain @ x[perm], rtol=1e-5)


def test_wrong_part_dtypes_are_named():
    scheme = parse_scheme("int6-g16-sym-s256")
    q = np.zeros((2, 256), np.uint8)
    with pytest.raises(BitsmithError, match="super_scales"):
        QuantizedWeight(q, np.zeros((2, 16), np.int8), None, scheme, 256)
    with pytest.raises(BitsmithError, match="scales are float16"):
        QuantizedWeight(q, np.zeros((2, 16), np.float16), None, scheme, 256, super_scales=np.ones((2, 1), np.float16))
